"""The per-layer switch of an injection: what it added, by backbone layer, and how to turn layers off.

Every mechanism of ``Injection`` records the backbone layer (transformer block) its thing belongs
to, found from where it sits in the model (or given by the method as ``layer=``):

- a module replacement (``replace``): its parent's block; off, the old module is put back;
- a forward hook (``add_hook``): the hooked module's block; off, the hook returns nothing (the
  module's own output, or its own inputs for a pre-hook, go through);
- a key/value prefix (``kv_prefix``): the attention layer it feeds; off, that layer attends
  without a prefix;
- trained base parameters (``train_base``: Houlsby's LayerNorms): the block they are in; off,
  they hold their pretrained values (kept when saved weights were loaded), and their trained
  values come back when the layer is on again.

Things outside every block (an input prompt's hook on the embeddings, a table hung on the base
model) have no layer and are never switched. A method "is per-layer" when it added something
switchable beyond trained base parameters: replacements, hooks or prefixes in some block (full
fine-tuning, the head alone and input prompts are not). With every layer off, the model computes
what the plain backbone with the trained task head computes (up to float rounding where a prefix
attention path stays installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from peftbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone


def layer_of_module(backbone: "Backbone", module: nn.Module) -> int | None:
    """The index of the block that holds ``module`` (the block itself included), else None."""
    for i, block in enumerate(backbone.layer_modules()):
        if any(m is module for m in block.modules()):
            return i
    return None


def layer_of_replacement(backbone: "Backbone", parent: nn.Module, old: nn.Module) -> int | None:
    """The block a replacement under ``parent`` is in (a whole block replaced: its own index)."""
    for i, block in enumerate(backbone.layer_modules()):
        if block is old:
            return i
    return layer_of_module(backbone, parent)


def layer_of_parameter(backbone: "Backbone", param: nn.Parameter) -> int | None:
    for i, block in enumerate(backbone.layer_modules()):
        if any(p is param for p in block.parameters()):
            return i
    return None


def _device(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


@dataclass
class _Replaced:
    layer: int
    parent: nn.Module
    attr: str
    old: nn.Module
    new: nn.Module
    moved_from: torch.device | None = None  # where ``old`` was kept while the method ran (QLoRA on a GPU)

    def switch_off(self) -> None:
        here, there = _device(self.new), _device(self.old)
        if here is not None and there is not None and here != there:
            self.old.to(here)
            self.moved_from = there
        setattr(self.parent, self.attr, self.old)

    def switch_on(self) -> None:
        setattr(self.parent, self.attr, self.new)
        if self.moved_from is not None:
            self.old.to(self.moved_from)
            self.moved_from = None


@dataclass
class _BaseParam:
    layer: int
    name: str
    param: nn.Parameter
    trained: torch.Tensor | None = None  # the trained value while the layer is off


@dataclass
class LayerSwitch:
    """The switchable parts of one injection, by layer, and the set of layers now off."""

    backbone: "Backbone"
    replaced: list[_Replaced] = field(default_factory=list)
    hooks: dict[int, int] = field(default_factory=dict)  # layer -> hooks in it
    slots: list[tuple[int, object]] = field(default_factory=list)  # (layer, kv-prefix slot with ``enabled``)
    base: list[_BaseParam] = field(default_factory=list)
    disabled: frozenset[int] = frozenset()

    # -- recording (called by Injection's mechanisms) ---------------------------------------
    def record_replace(self, parent: nn.Module, attr: str, old: nn.Module, new: nn.Module, layer: int | None) -> None:
        layer = layer_of_replacement(self.backbone, parent, old) if layer is None else layer
        if layer is not None:
            self.replaced.append(_Replaced(layer, parent, attr, old, new))

    def gate_hook(self, module: nn.Module, hook: Callable, layer: int | None) -> Callable:
        """``hook``, silent while its layer is off (returning None keeps the module's output or inputs)."""
        layer = layer_of_module(self.backbone, module) if layer is None else layer
        if layer is None:
            return hook
        self.hooks[layer] = self.hooks.get(layer, 0) + 1

        def gated(*args, **kwargs):
            if layer in self.disabled:
                return None
            return hook(*args, **kwargs)

        return gated

    def record_slots(self, slots: dict[int, object]) -> None:
        self.slots.extend(slots.items())

    def record_base(self, name: str, param: nn.Parameter) -> None:
        layer = layer_of_parameter(self.backbone, param)
        if layer is not None:
            self.base.append(_BaseParam(layer, name, param))

    def forget(self, names: Iterable[str]) -> None:
        gone = set(names)
        self.base = [b for b in self.base if b.name not in gone]

    # -- what there is ------------------------------------------------------------------------
    def layers(self) -> list[int]:
        """The layers holding something switchable other than trained base parameters."""
        found = {r.layer for r in self.replaced} | set(self.hooks) | {layer for layer, _ in self.slots}
        return sorted(found)

    # -- switching ----------------------------------------------------------------------------
    def set_disabled(self, layers: Iterable[int], originals: dict[str, torch.Tensor] | None) -> None:
        layers = frozenset(int(i) for i in layers)
        n = len(self.backbone.layer_modules())
        bad = sorted(i for i in layers if not 0 <= i < n)
        if bad:
            raise ConfigError(f"layers {bad} do not exist: {self.backbone.name} has layers 0..{n - 1}")
        off, on = layers - self.disabled, self.disabled - layers
        missing = sorted({b.layer for b in self.base if b.layer in off and (originals is None or b.name not in originals)})
        if missing:
            raise ConfigError(f"layers {missing} hold trained base parameters whose pretrained values were not kept; "
                              f"load the injection from saved weights (load_injection) before switching layers off")
        for rec in reversed(self.replaced):  # nested replacements of one site come off last-made first
            if rec.layer in off:
                rec.switch_off()
        for rec in self.replaced:
            if rec.layer in on:
                rec.switch_on()
        with torch.no_grad():
            for b in self.base:
                if b.layer in off:
                    b.trained = b.param.detach().clone()
                    b.param.copy_(originals[b.name])
                elif b.layer in on:
                    b.param.copy_(b.trained)
                    b.trained = None
        for layer, slot in self.slots:
            slot.enabled = layer not in layers
        self.disabled = layers
