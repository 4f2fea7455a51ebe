"""peftbench: compare PEFT methods on one backbone under one matched parameter budget.

This module is the public API: plugin authors import only ``peftbench``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from peftbench.backbones.backbone import TASK_KINDS, Backbone, BackboneSpec, from_config, load_backbone, spec_for
from peftbench.budget import Budget, Solution, parse_budget, solve, solve_or_raise, verify
from peftbench.errors import (
    AssetError,
    BudgetError,
    ConfigError,
    LayoutError,
    PeftbenchError,
    PluginError,
    VerificationError,
)
from peftbench.contract.hookspecs import hookimpl, hookspec
from peftbench.contract.injection import Injection, load_injection
from peftbench.backbones.layout import LINEAR_SITES, SITE_NAMES, ArchLayout, Site, is_conv1d, linear_shape
from peftbench.contract.method import Method, MethodConfig
from peftbench.contract.registry import get_registry
from peftbench.backbones import quant
from peftbench.backbones.quant import logical_numel
from peftbench.tasks.task import Task, get_task, packaged_data

__all__ = [
    "ArchLayout", "AssetError", "Backbone", "BackboneSpec", "Budget", "BudgetError", "ConfigError",
    "Injection", "LINEAR_SITES", "LayoutError", "Method", "MethodConfig", "PeftbenchError", "PluginError",
    "SITE_NAMES", "Site", "Solution", "TASK_KINDS", "VerificationError", "from_config", "get_registry",
    "hookimpl", "hookspec", "is_conv1d", "linear_shape", "load_backbone", "load_injection", "logical_numel",
    "parse_budget", "solve", "solve_or_raise", "spec_for", "verify",
    "Task", "get_task", "packaged_data",
]
