"""peftbench: compare PEFT methods on one backbone under one matched parameter budget.

This module is the public API: plugin authors import only ``peftbench``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from peftbench.backbones.bnb_notice import quiet_bitsandbytes

quiet_bitsandbytes()  # before anything (peft included) imports bitsandbytes: its known kernels notice stays out

from peftbench.backbones.backbone import TASK_KINDS, Backbone, BackboneSpec, from_config, load_backbone, spec_for
from peftbench.budget import Budget, Solution, parse_budget, solve, solve_or_raise
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
from peftbench.contract.apply import apply, measure
from peftbench.contract.costs import Cost
from peftbench.contract.injection import Injection, load_injection
from peftbench.backbones.layout import LINEAR_SITES, SITE_NAMES, ArchLayout, Site, is_conv1d, linear_shape
from peftbench.backbones.kv_prefix import kv_prefix_for
from peftbench.contract.method import Method, MethodConfig, PeftAdapter
from peftbench.contract.method import PerLayerConfig
from peftbench.contract.registry import get_registry
from peftbench.backbones import quant
from peftbench.backbones.quant import logical_numel
from peftbench.tasks.resolve import packaged_data
from peftbench.tasks.task import Task
from peftbench import blocks  # public building blocks for methods: the LoRA linear, target helpers


def get_task(spec: str, registry=None, **options) -> Task:
    """The Task ``spec`` names: ``file:PATH``, ``hub:NAME``, a GLUE name or a registered task
    (looked up in ``registry``, by default every installed plugin's)."""
    from peftbench.tasks.resolve import get_task as resolve

    return resolve(spec, registry if registry is not None else get_registry(), **options)


__all__ = [
    "ReportContext", "Section", "apply", "measure", "Cost",
    "ArchLayout", "AssetError", "Backbone", "BackboneSpec", "Budget", "BudgetError", "ConfigError", "Cost",
    "Injection", "LINEAR_SITES", "LayoutError", "Method", "MethodConfig", "PerLayerConfig", "PeftAdapter", "PeftbenchError", "PluginError",
    "SITE_NAMES", "Site", "Solution", "TASK_KINDS", "VerificationError", "apply", "from_config", "get_registry",
    "hookimpl", "hookspec", "is_conv1d", "kv_prefix_for", "linear_shape", "load_backbone", "load_injection", "logical_numel",
    "measure", "parse_budget", "quant", "solve", "solve_or_raise", "spec_for",
    "Task", "get_task", "packaged_data", "load", "Model", "blocks",
]


def __getattr__(name: str):
    """``peftbench.Section`` and ``peftbench.ReportContext`` for report plugins, imported on first use
    (the report's statistics need scipy, which the rest of the API does not); ``peftbench.load`` and
    ``peftbench.Model`` (using a trained adapter) likewise."""
    if name in ("ReportContext", "Section"):
        from peftbench.report import context

        return getattr(context, name)
    if name == "load":
        from peftbench.using.load import load

        return load
    if name == "Model":
        from peftbench.using.model import Model

        return Model
    raise AttributeError(f"module 'peftbench' has no attribute {name!r}")
