"""Injection: what a method added to a backbone, and how to take it off, save it, load it.

The core offers exactly three insertion mechanisms, each undoable:
- ``replace(parent, attr, new)``: module replacement; the new module keeps the old one as
  ``base_layer`` (LoRA family, 4-bit);
- ``add_hook(module, fn)``: a forward hook on a site (bottleneck adapters, input prompts);
- ``kv_prefix(provider)``: per-layer key/value prefixes through the attention-function
  registry (prefix tuning, P-tuning v2); see ``peftbench.backbones.kv_prefix``.
Each mechanism records the backbone layer its thing belongs to, so that ``disable_layers`` /
``layers_disabled`` can make chosen layers compute as the plain backbone (layer ablation; see
``peftbench.contract.layers``). ``attach`` hangs a method's own module (its parameters) under a model module so that
``model.parameters()``, ``.to(device)`` and the Trainer see it. Injections are made by
``peftbench.apply`` (never by calling ``inject`` directly), which records the counted
``trainable_params``; ``costs()`` names a method's extra cost figures for the report.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftbench.contract.apply import apply
from peftbench.contract.costs import Cost
from peftbench.contract.layers import LayerSwitch
from peftbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone
    from peftbench.contract.method import Method, MethodConfig

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
ATTACH_PREFIX = "peftbench_"
#: the version of what ``save`` writes; 0: folders written before versions (no labels, no backbone hash)
ADAPTER_FORMAT_VERSION = 1


class Injection:
    """The record of one method injected into one backbone."""

    def __init__(self, backbone: "Backbone", method: "Method", cfg: "MethodConfig"):
        self.backbone = backbone
        self.method = method
        self.config = cfg
        self._undo: list[Callable[[], None]] = []
        self._owned: dict[str, nn.Module] = {}  # name -> module whose state is the method's
        self._base_trainable: dict[str, nn.Parameter] = {}  # base params the method trains
        self.finalized = False
        self.removed = False
        self._kept_base: dict[str, torch.Tensor] | None = None  # base parameters' values before loading
        self._switch = LayerSwitch(backbone)  # what was added, by layer; which layers are off
        #: parameters requiring grad after injection (head excluded), counted by ``apply``
        self.trainable_params: int | None = None

    # -- mechanisms ----------------------------------------------------------------------
    def attach(self, parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
        """Hang ``module`` under ``parent`` as ``peftbench_<name>``; its state is saved."""
        attr = ATTACH_PREFIX + name
        if hasattr(parent, attr):
            raise ConfigError(f"method {self.method.name!r}: {type(parent).__name__} already carries {attr!r}")
        parent.add_module(attr, module)
        key = self._key(parent, attr)
        self._owned[key] = module
        self._undo.append(lambda: (delattr(parent, attr), self._owned.pop(key, None)))
        return module

    def replace(self, parent: nn.Module, attr: str, new: nn.Module, owned: dict[str, nn.Module] | None = None,
                *, layer: int | None = None) -> nn.Module:
        """Put ``new`` where ``parent.<attr>`` was; ``owned`` names new's trainable parts; ``layer``: the
        backbone layer it belongs to (default: the block that holds ``parent``)."""
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._switch.record_replace(parent, attr, old, new, layer)
        keys = []
        for sub, module in (owned or {}).items():
            key = self._key(parent, f"{attr}.{sub}")
            self._owned[key] = module
            keys.append(key)

        def undo():
            setattr(parent, attr, old)
            for key in keys:
                self._owned.pop(key, None)

        self._undo.append(undo)
        return new

    def add_hook(self, module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False,
                 layer: int | None = None) -> None:
        """A forward (or forward-pre) hook on ``module``; removed by ``remove()``; ``layer``: the backbone
        layer it belongs to (default: the block that holds ``module``; none outside the blocks)."""
        hook = self._switch.gate_hook(module, hook, layer)
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)

    def train_base(self, params: dict[str, nn.Parameter]) -> None:
        """Make some base parameters trainable (Houlsby's LayerNorms, top-k layers)."""
        for name, param in params.items():
            before = param.requires_grad
            param.requires_grad_(True)
            self._base_trainable[name] = param
            self._switch.record_base(name, param)
            self._undo.append(lambda p=param, b=before, n=name: (p.requires_grad_(b), self._base_trainable.pop(n, None),
                                                                 self._switch.forget([n])))

    def kv_prefix(self, provider, layers: list[int] | None = None) -> None:
        """Feed ``provider(layer, batch) -> (key, value)``, each (batch, kv_heads, n, head_dim)."""
        from peftbench.backbones.kv_prefix import attach_kv_prefix

        attachment = attach_kv_prefix(self.backbone, provider, layers)
        self._switch.record_slots(attachment.slots)
        self._undo.append(attachment)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the injection is removed (after later undos, before earlier ones)."""
        self._undo.append(fn)

    # -- lifecycle -----------------------------------------------------------------------
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after each optimizer step, before the gradients are zeroed: ``step`` counts
        from 0, ``total_steps`` is the schedule's length (early stopping may end training sooner). For methods
        that change themselves while they train (a rank allocator reading the gradients); default: nothing."""

    def merge(self) -> None:
        """Fold the method into the base weights for inference, where it can (LoRA)."""

    def unmerge(self) -> None:
        """Undo ``merge``."""

    def costs(self) -> dict[str, Cost]:
        """Extra cost figures, label -> Cost (QLoRA: its 4-bit weights' bytes). Default: none."""
        return {}

    def finalize(self) -> None:
        """Turn training-time structure into what is stored (prefix tuning drops its MLP)."""
        self.finalized = True

    def remove(self) -> None:
        """Restore the backbone exactly as it was before ``inject``."""
        if self.removed:
            return
        self.disable_layers(())
        self.unmerge()
        while self._undo:
            self._undo.pop()()
        self.removed = True

    # -- per-layer switch (layer ablation) -----------------------------------------------
    def layers(self) -> list[int]:
        """The backbone layers holding something the method added (replaced modules, hooks, key/value
        prefixes); empty for a method with nothing per-layer (a prompt, the head, full fine-tuning)."""
        return self._switch.layers()

    @property
    def disabled_layers(self) -> frozenset[int]:
        return self._switch.disabled

    def disable_layers(self, layers) -> None:
        """Make exactly ``layers`` compute as the plain backbone (the others as trained); ``()`` turns every
        layer back on, exactly as it was. The method is unmerged first (a merged weight is not per-layer)."""
        if frozenset(layers) and not self.layers():
            raise ConfigError(f"method {self.method.name!r} is not per-layer: it added nothing to the backbone's "
                              f"layers that could be switched off")
        if frozenset(layers):
            self.unmerge()
        self._switch.set_disabled(layers, self._kept_base)

    @contextmanager
    def layers_disabled(self, layers):
        """``with injection.layers_disabled({2, 3}): ...``: those layers off inside, the previous state after."""
        before = self.disabled_layers
        self.disable_layers(layers)
        try:
            yield self
        finally:
            self.disable_layers(before)

    # -- state ---------------------------------------------------------------------------
    def _key(self, parent: nn.Module, attr: str) -> str:
        for name, module in self.backbone.model.named_modules():
            if module is parent:
                return f"{name}.{attr}" if name else attr
        raise ConfigError(f"method {self.method.name!r}: module {type(parent).__name__} is not in the model")

    def added_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of the modules the method added (trained base parameters excluded)."""
        return {
            f"{key}.{name}": p for key, module in self._owned.items() for name, p in module.named_parameters()
        }

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The method's parameters (owned modules and trained base parameters), head excluded."""
        return {**self.added_parameters(), **self._base_trainable}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What is saved: owned modules' parameters and buffers, trained base parameters."""
        if self.disabled_layers:
            raise ConfigError(f"method {self.method.name!r}: layers {sorted(self.disabled_layers)} are switched off; "
                              f"turn them back on (disable_layers(())) before saving")
        out: dict[str, torch.Tensor] = {}
        for key, module in self._owned.items():
            for name, t in module.state_dict().items():
                out[f"{key}.{name}"] = t
        for name, p in self._base_trainable.items():
            out[name] = p.data
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(k for k in set(state) - set(own) if not k.startswith("head."))
        if missing or unexpected:
            raise ConfigError(
                f"method {self.method.name!r}: saved weights do not match the injection "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        wrong = [f"{k} saved {tuple(state[k].shape)}, injection {tuple(t.shape)}"
                 for k, t in own.items() if tuple(state[k].shape) != tuple(t.shape)]
        if wrong:
            raise ConfigError(f"method {self.method.name!r}: saved weights have other shapes than the injection "
                              f"({'; '.join(wrong[:3])}{f'; {len(wrong) - 3} more' if len(wrong) > 3 else ''})")
        self._keep_base_values()
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(tensor.device, tensor.dtype))

    def _keep_base_values(self) -> None:
        """Before loaded weights overwrite base parameters the method trains (Houlsby's LayerNorms, full
        fine-tuning), keep their values, so ``remove()`` restores them too (switching adapters)."""
        if not self._base_trainable or self._kept_base is not None:
            return
        kept = self._kept_base = {name: p.detach().clone() for name, p in self._base_trainable.items()}
        params = dict(self._base_trainable)

        def restore():
            with torch.no_grad():
                for name, value in kept.items():
                    params[name].copy_(value)

        self._undo.append(restore)

    def save(self, directory: str | Path, include_head: bool = True, metadata: dict | None = None) -> Path:
        """Write ``adapter_model.safetensors`` (method weights, plus ``head.*``) and the JSON config;
        ``metadata`` (label names, the backbone's hash, ...) is added to the config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if include_head:
            for name, p in self.backbone.head_parameters().items():
                tensors[f"head.{name}"] = p.detach().cpu().contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {
            "method": self.method.name,
            "config": self.config.model_dump(mode="json"),
            "finalized": self.finalized,
            "backbone": self.backbone.spec.name,
            "model_type": self.backbone.spec.model_type,
            "format_version": ADAPTER_FORMAT_VERSION,
            **(metadata or {}),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.named_parameters().values())
        return f"<Injection {self.method.name} params={n}>"


def load_injection(backbone: "Backbone", directory: str | Path, registry) -> Injection:
    """Apply the saved method to ``backbone`` (through ``apply``) and load its weights (and head).

    ``registry`` (``peftbench.get_registry()`` or any object with ``.method(name)``) finds
    the saved method by name.
    """
    directory = Path(directory)
    meta_path = directory / CONFIG_FILE
    if not meta_path.exists():
        raise ConfigError(f"{directory} holds no {CONFIG_FILE}: not a saved peftbench injection")
    meta = json.loads(meta_path.read_text())
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= ADAPTER_FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: format_version {version!r} is unknown; this peftbench reads versions "
                          f"0..{ADAPTER_FORMAT_VERSION} (a newer peftbench wrote it?)")
    if "method" not in meta or "config" not in meta:
        raise ConfigError(f"{meta_path} names no method and config: not a saved peftbench injection")
    try:
        method = registry.method(meta["method"])
    except ConfigError as exc:
        raise ConfigError(f"{directory} was saved by method {meta['method']!r}, which is not installed here ({exc})") from None
    injection = apply(method, backbone, meta["config"])
    try:
        if meta.get("finalized"):
            injection.finalize()
        state = load_file(str(directory / WEIGHTS_FILE))
        injection.load_state_dict(state)
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        if head:
            backbone.load_head(head)
    except BaseException:
        injection.remove()  # weights that do not fit leave the backbone as it was
        raise
    return injection
