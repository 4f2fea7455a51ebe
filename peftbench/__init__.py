"""peftbench: compare PEFT methods on one backbone under one matched parameter budget.

This module is the public API: plugin authors import only ``peftbench``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbone import TASK_KINDS, Backbone, BackboneSpec, from_config, load_backbone, spec_for
from .budget import Budget, Solution, parse_budget, solve, solve_or_raise, verify
from .errors import (
    AssetError,
    BudgetError,
    ConfigError,
    LayoutError,
    PeftbenchError,
    PluginError,
    VerificationError,
)
from .hookspecs import hookimpl, hookspec
from .inject import Injection, load_injection
from .layout import LINEAR_SITES, SITE_NAMES, ArchLayout, Site, is_conv1d, linear_shape
from .method import Method, MethodConfig
from .plugins import get_registry
from .quant import logical_numel
from .tasks import Task, get_task, packaged_data

__all__ = [
    "ArchLayout", "AssetError", "Backbone", "BackboneSpec", "Budget", "BudgetError", "ConfigError",
    "Injection", "LINEAR_SITES", "LayoutError", "Method", "MethodConfig", "PeftbenchError", "PluginError",
    "SITE_NAMES", "Site", "Solution", "TASK_KINDS", "VerificationError", "from_config", "get_registry",
    "hookimpl", "hookspec", "is_conv1d", "linear_shape", "load_backbone", "load_injection", "logical_numel",
    "parse_budget", "solve", "solve_or_raise", "spec_for", "verify",
    "Task", "get_task", "packaged_data",
]
