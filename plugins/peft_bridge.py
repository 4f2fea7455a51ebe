"""peft's layer tuners as peftbench methods: ``peft:lora``, ``peft:dora``, ``peft:ia3``, ``peft:vera``, ...

Each bridged method builds the tuner's peft config (``peft.LoraConfig``, ``peft.VeraConfig``, ...) with
``target_modules`` set to the module paths of the backbone's layout sites it targets (``targets``: site
names such as ``q, v`` or ``all-linear``; layer norms for ``ln_tuning``), and lets peft put its own layers
in place (the tuner class ``inject_adapter_in_model`` uses). Each replaced module is then handed to
``Injection.replace``, so ``remove()``, saving and loading work as for every other method, and
``merge()`` folds the tuner into the base weights with peft's own ``merge`` (undone bit for bit).

Sizes: peft gives no closed form for most tuners, so ``param_count`` counts by instantiating: peft's
tuner is applied to a skeleton of the backbone built on the meta device from the spec (every layer,
with the targeted modules at their paths and shapes; fused projections whole), and the parameters that
require grad are counted; no memory is spent on weights. The solver searches the tuner's size field
(``r``, ``init_r``, ``n_frequency``, a block size whose allowed values are the common divisors of the
targets' input widths that peft accepts); ``param_count`` must be non-decreasing in it, which is checked
on a spread of knob values the first time a config is solved, and a breach is an error naming both
points. (IA)^3 and LN tuning have no size field: they are knob-less, like other methods without a knob.

peft's prompt-learning tuners (prefix and prompt tuning, P-tuning) wrap the whole model rather than
layers: they are bridged apart, in ``peft_prompts`` (registered by this plugin's hook).
AdaLoRA (``peft:adalora``) runs as in peft's own training loop: the solver sets the initial rank ``init_r``
(what the optimizer holds, hence the budget; peft's count too), the target rank defaults to 2/3 of it (peft's
defaults, 8 of 12), and after each optimizer step (``Injection.after_optimizer_step``) peft's
``update_and_allocate`` scores every singular value by its sensitivity and masks the least important ones,
cubically from ``init_r`` down to ``target_r`` per module on average over the trial's planned steps
(``total_step`` is set from the schedule; ``tinit``, ``tfinal``, ``deltaT`` and ``orth_reg_weight`` may be
passed in ``options``). Its orthogonality penalty on P and Q is added to the training loss, as peft's
``AdaLoraModel.forward`` does (in training mode only: validation losses stay the task's). Masked singular
values are stored as zeros. A trial keeps its best validation state, which may come from before the
allocation reached ``target_r`` (more unmasked values, never more parameters than the budget).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, create_model, field_validator
from torch import nn

import peftbench

ALL_LINEAR = "all-linear"
NORM_SITES = tuple(n for n in peftbench.SITE_NAMES if n.endswith("_norm"))
ADAPTER = "default"  # peft's adapter name for the one adapter each injection makes


@dataclass(frozen=True)
class Tuner:
    """One peft tuner and how the bridge sizes it."""

    name: str  #: peftbench name after ``peft:``
    peft_type: str  #: key of peft's PEFT_TYPE_TO_CONFIG_MAPPING
    knob: str | None  #: the peft config field the solver sets; None: knob-less
    default: int | None
    #: how the knob is bounded: ``rank`` 1..min width of a target; ``wide`` 1..8 x max width (VeRA's shared
    #: random matrices); ``cells`` 1..d_in x d_out (Fourier coefficients); ``block`` a common divisor of the
    #: targets' input widths that peft accepts
    kind: str
    targets: tuple[str, ...] | str
    inserts: str
    lr: float
    fixed: dict[str, Any] = field(default_factory=dict)
    norms: bool = False  #: targets are layer norms, not linears
    feedforward: tuple[str, ...] = ()  #: (IA)^3's default feedforward sites
    mergeable: bool = True


TUNERS = [
    Tuner("lora", "LORA", "r", 8, "rank", ("q", "v"), "peft's LoRA: (alpha/r)·B·A beside target linears", 5e-3),
    Tuner("dora", "LORA", "r", 8, "rank", ("q", "v"), "peft's DoRA: LoRA on the direction, a trained magnitude "
          "per output", 5e-3, {"use_dora": True}),
    Tuner("adalora", "ADALORA", "init_r", 12, "rank", ("q", "v"), "peft's AdaLoRA: P·Λ·Q updates whose "
          "ranks peft's allocator prunes by importance while training (init_r solved, target_r 2/3 of it)", 5e-3,
          {"total_step": 1000}),
    Tuner("loha", "LOHA", "r", 8, "rank", ("q", "v"), "peft's LoHa: Hadamard product of two low-rank updates", 5e-3),
    Tuner("lokr", "LOKR", "r", 8, "rank", ("q", "v"), "peft's LoKr: Kronecker product update", 5e-3),
    Tuner("vera", "VERA", "r", 256, "wide", ALL_LINEAR, "peft's VeRA: trained scaling vectors around shared "
          "frozen random matrices", 1e-2),
    Tuner("fourierft", "FOURIERFT", "n_frequency", 1000, "cells", ("q", "v"), "peft's FourierFT: n trained "
          "spectral coefficients per target", 5e-2),
    Tuner("oft", "OFT", "oft_block_size", 32, "block", ("q", "v"), "peft's OFT: block-diagonal orthogonal "
          "rotation of target weights", 5e-3, {"r": 0}),
    Tuner("boft", "BOFT", "boft_block_size", 4, "block", ("q", "v"), "peft's BOFT: butterfly-factorised "
          "orthogonal rotation", 5e-3, {"boft_block_num": 0}),
    Tuner("ia3", "IA3", None, None, "", ("k", "v", "ffn_out"), "peft's (IA)^3: trained scaling of keys, values "
          "and the FFN input of ffn_out", 1e-2, feedforward=("ffn_out",)),
    Tuner("ln_tuning", "LN_TUNING", None, None, "", NORM_SITES, "peft's LN tuning: trained copies of the layer "
          "norms", 5e-3, norms=True),
]


def _peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING


# -- targets -------------------------------------------------------------------------------
def _site_list(value, allowed: tuple[str, ...], what: str):
    if isinstance(value, str) and value != ALL_LINEAR:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if value == ALL_LINEAR:
        if allowed != peftbench.LINEAR_SITES:
            raise ValueError(f"{what} must be site names from {', '.join(allowed)}")
        return value
    bad = [v for v in value if v not in allowed]
    if bad or not value:
        raise ValueError(f"{what} must be {ALL_LINEAR!r} or site names from {', '.join(allowed)}; got {value}")
    return list(dict.fromkeys(value))


def _target_sites(method: str, targets, spec: peftbench.BackboneSpec, norms: bool) -> list[str]:
    """The site names ``targets`` means on ``spec``; a site the backbone lacks is an error naming what it has."""
    have = [n for n in (NORM_SITES if norms else peftbench.LINEAR_SITES) if n in spec.site_paths]
    if targets == ALL_LINEAR:
        return have
    missing = [n for n in targets if n not in spec.site_paths]
    if missing:
        raise peftbench.ConfigError(f"method {method!r}: field 'targets' names {missing}, which {spec.name} "
                                    f"({spec.model_type}) lacks; it has: {', '.join(have)}")
    return list(targets)


def _modules(sites: list[str], spec: peftbench.BackboneSpec, norms: bool) -> dict[str, tuple[int, ...]]:
    """Block-relative module path -> (d_in, d_out) of each targeted linear (a fused projection whole: its
    slices' widths summed) or (parameters,) of each targeted norm."""
    if norms:
        return {spec.site_paths[n]: (spec.norm_params[n],) for n in sites}
    out: dict[str, tuple[int, int]] = {}
    for name, path in spec.site_paths.items():  # every slice of a fused module adds its width
        if name in spec.site_shapes and path in {spec.site_paths[s] for s in sites}:
            d_in, d_out = spec.site_shapes[name]
            out[path] = (d_in, out.get(path, (d_in, 0))[1] + d_out)
    return out


# -- counting on the meta device -----------------------------------------------------------
def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


def skeleton(modules: dict[str, tuple[int, ...]], layers: int, hidden: int) -> nn.Module:
    """A model of ``layers`` blocks holding only ``modules`` (block path -> shape), on the meta device:
    ``nn.Linear(d_in, d_out)`` for a linear, a LayerNorm of ``hidden`` (with a bias when it has 2 x hidden
    parameters) for a norm. Its module names are ``layers.<i>.<path>``."""
    root = nn.Module()
    root.layers = nn.ModuleList()
    with torch.device("meta"):
        for _ in range(layers):
            block = nn.Module()
            for path, shape in modules.items():
                if len(shape) == 1:
                    norm = nn.LayerNorm(hidden, bias=shape[0] == 2 * hidden) if shape[0] in (hidden, 2 * hidden) \
                        else nn.LayerNorm(shape[0], bias=False)
                    _set_path(block, path, norm)
                else:
                    _set_path(block, path, nn.Linear(*shape))
            root.layers.append(block)
    root.requires_grad_(False)
    return root


def count_on_meta(peft_config, model: nn.Module) -> int:
    """Trainable parameters peft's tuner for ``peft_config`` adds to ``model`` (a meta-device model):
    the tuner is applied with its adapters created on the meta device and what requires grad is counted."""
    _, tuners = _peft()
    with warnings.catch_warnings():  # low_cpu_mem_usage: peft creates the adapter parameters on the meta device
        warnings.simplefilter("ignore")
        tuners[peft_config.peft_type](model, peft_config, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    # what peft's layers hold under their adapter names and train (init_empty_weights re-creates parameters,
    # so a frozen one such as AdaLoRA's ranknum is read from the layer's declared adapter parameters only)
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: set[int] = set()
    total = 0
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for name in layer.adapter_layer_names:
                part = getattr(layer, name, None)
                for p in part.parameters() if isinstance(part, nn.Module) else ():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
    return total


# -- the method ----------------------------------------------------------------------------
class BridgeInjection(peftbench.Injection):
    """A peft tuner's layers in the backbone; merge uses peft's, unmerge restores the kept base weights."""

    def __init__(self, backbone, method, cfg):
        super().__init__(backbone, method, cfg)
        self.tuner_layers: list[nn.Module] = []  # peft's tuner layers (BaseTunerLayer)
        self._kept: list[tuple[nn.Module, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]]] = []

    def merge(self) -> None:
        if self._kept:
            return
        for layer in self.tuner_layers:
            base = layer.get_base_layer()
            params = [(p, p.data, p.detach().clone()) for p in base.parameters()]  # (param, its tensor, values)
            self._kept.append((base, params))
            with torch.no_grad():
                layer.merge()

    def unmerge(self) -> None:
        """Back to the weights before ``merge``, bit for bit (peft's unmerge subtracts: rounding)."""
        for layer, (base, params) in zip(self.tuner_layers, self._kept):
            if layer.get_base_layer() is not base:  # a tuner that merges by swapping modules (LN tuning)
                layer.unmerge()
                continue
            with torch.no_grad():
                for param, tensor, values in params:
                    tensor.copy_(values)
                    param.data = tensor
            layer.merged_adapters.clear()
        self._kept = []


class AdaLoraInjection(BridgeInjection):
    """peft's AdaLoRA layers, its rank allocator after each optimizer step, its orthogonality penalty."""

    tuner_model = None  # peft's AdaLoraModel around the backbone's model: its ``update_and_allocate``

    def start(self) -> None:
        """Add the orthogonality penalty to the training loss (as ``AdaLoraModel.forward``)."""
        weight = self.tuner_model.peft_config[ADAPTER].orth_reg_weight
        if weight < 0:
            raise peftbench.ConfigError(f"method {self.method.name!r}: options.orth_reg_weight must be >= 0, "
                                        f"got {weight}")
        if weight:
            self.add_hook(self.backbone.model, lambda module, args, out: self._penalise(module, out, weight))

    def _penalise(self, module, out, weight: float):
        loss = getattr(out, "loss", None)
        if not module.training or not isinstance(loss, torch.Tensor):
            return out
        terms = []
        for layer in self.tuner_layers:
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device, dtype=cov.dtype)))
        out.loss = loss + weight * torch.stack(terms).mean()
        return out

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        config = self.tuner_model.peft_config[ADAPTER]
        if config.target_r >= self.config.init_r:  # nothing to prune
            return
        if step == 0:
            config.total_step = total_steps
            if config.tinit >= total_steps - config.tfinal:
                raise peftbench.ConfigError(
                    f"method {self.method.name!r}: options tinit={config.tinit} and tfinal={config.tfinal} leave no "
                    f"steps for rank allocation in a schedule of {total_steps} steps")
        self.tuner_model.update_and_allocate(step)

    def ranks(self) -> dict[str, int]:
        """Module path -> singular values left unmasked (non-zero Λ entries)."""
        names = {id(layer): n for n, layer in self.backbone.model.named_modules()}
        return {names[id(layer)]: int((layer.lora_E[ADAPTER] != 0).sum()) for layer in self.tuner_layers}


class PeftMethod(peftbench.Method):
    """One peft tuner as a peftbench method (an instance per tuner, registered as ``peft:<tuner>``)."""

    def __init__(self, tuner: Tuner):
        configs, _ = _peft()
        self.tuner = tuner
        self.peft_config_class = configs[tuner.peft_type]
        self.name = f"peft:{tuner.name}"
        self.knob = tuner.knob
        self.inserts = tuner.inserts
        self.default_lr = tuner.lr  # the tuner's usual rate (not swept on peftbench's schedule: schedule_lr None)
        self.in_default_grid = False  # run when named: the default comparison stays peftbench's own methods
        self.mergeable = tuner.mergeable
        self.Config = self._config_class()
        self._counts: dict[tuple, int] = {}
        self._checked: set[tuple] = set()

    def _config_class(self):
        t, allowed = self.tuner, (NORM_SITES if self.tuner.norms else peftbench.LINEAR_SITES)
        fields: dict[str, Any] = {}
        if t.knob:
            fields[t.knob] = (int, Field(t.default, ge=1, description=f"peft's {self.peft_config_class.__name__}."
                                                                          f"{t.knob}: the size the solver sets"))
        default = t.targets if isinstance(t.targets, str) else list(t.targets)
        fields["targets"] = (list[str] | Literal["all-linear"],
                             Field(default, description=f"sites whose modules peft targets ({', '.join(allowed)})"))
        validators = {"_targets": field_validator("targets", mode="before")(
            lambda v: _site_list(v, allowed, "targets"))}
        if t.feedforward:
            fields["feedforward"] = (list[str], Field(list(t.feedforward), description="targets whose input "
                                                      "(IA)^3 scales instead of their output"))
            validators["_feedforward"] = field_validator("feedforward", mode="before")(
                lambda v: _site_list(v, peftbench.LINEAR_SITES, "feedforward"))
        fields["options"] = (dict[str, Any], Field(default_factory=dict, description=f"further fields of peft's "
                                                   f"{self.peft_config_class.__name__}, passed as they are"))
        name = "".join(p.capitalize() for p in t.name.split("_"))
        return create_model(f"Peft{name}Config", __base__=peftbench.MethodConfig, __validators__=validators, **fields)

    # -- peft configs ------------------------------------------------------------------------
    def peft_config(self, cfg, paths: list[str], feedforward: list[str] = (), fan_in_fan_out: bool = False):
        """peft's config for ``cfg`` targeting the modules at ``paths`` (exact names); bad options: ConfigError."""
        owned = {"target_modules", *([self.knob] if self.knob else []), "feedforward_modules"}
        clash = sorted(owned & set(cfg.options))
        if clash:
            raise peftbench.ConfigError(f"method {self.name!r}: field 'options' sets {clash}, which the bridge sets "
                                        f"(use the fields {self.knob or 'targets'} / targets instead)")
        values = {**self.tuner.fixed, **cfg.options, "target_modules": list(paths)}
        if self.knob:
            values[self.knob] = getattr(cfg, self.knob)
        if self.tuner.name == "adalora":  # peft's default ratio (target 8 of init 12)
            values.setdefault("target_r", max(1, round(2 * values["init_r"] / 3)))
        if self.tuner.feedforward:
            values["feedforward_modules"] = list(feedforward)
        if fan_in_fan_out and "fan_in_fan_out" in self.peft_config_class.__dataclass_fields__:
            values["fan_in_fan_out"] = True
        try:
            return self.peft_config_class(**values)
        except Exception as exc:  # peft's own validation: name the method
            raise peftbench.ConfigError(f"method {self.name!r}: peft's {self.peft_config_class.__name__} refuses "
                                        f"{values}: {type(exc).__name__}: {exc}") from None

    def _plan(self, cfg, spec):
        """(block path -> shape of every target module, block paths that are feedforward)."""
        sites = _target_sites(self.name, cfg.targets, spec, self.tuner.norms)
        modules = _modules(sites, spec, self.tuner.norms)
        ff = {spec.site_paths[n] for n in getattr(cfg, "feedforward", []) if n in sites and n in spec.site_paths}
        return modules, ff

    # -- sizes -------------------------------------------------------------------------------
    def _count(self, cfg, spec, layers: int | None = None) -> int:
        modules, ff = self._plan(cfg, spec)
        layers = spec.layers if layers is None else layers
        key = (cfg.model_dump_json(), spec.name, spec.hidden, layers, tuple(sorted(modules.items())), tuple(sorted(ff)))
        if key not in self._counts:
            model = skeleton(modules, layers, spec.hidden)
            paths = [f"layers.{i}.{p}" for i in range(layers) for p in modules]
            ffs = [f"layers.{i}.{p}" for i in range(layers) for p in ff]
            try:
                self._counts[key] = count_on_meta(self.peft_config(cfg, paths, ffs), model)
            except peftbench.ConfigError:
                raise
            except Exception as exc:
                raise peftbench.ConfigError(f"method {self.name!r}: peft cannot build {self.knob}="
                                            f"{self.knob_value(cfg)} on {spec.name}: {type(exc).__name__}: {exc}") from None
        return self._counts[key]

    def param_count(self, cfg, spec):
        # counted by instantiating peft's tuner on a meta-device skeleton of the backbone (no closed form)
        self._check_monotone(cfg, spec)
        return self._count(cfg, spec)

    def knob_range(self, cfg, spec):
        """The tuner's bounds (see ``Tuner.kind``), cut where peft's count first drops (LoKr switches to a
        full Kronecker factor at large r): the solver needs a non-decreasing count."""
        modules, _ = self._plan(cfg, spec)
        shapes = list(modules.values())
        if self.tuner.kind == "block":
            values = self.knob_values(cfg, spec)
            return values[0], values[-1]
        hi = {"rank": min(min(s) for s in shapes), "wide": 8 * max(max(s) for s in shapes),
              "cells": min(a * b for a, b in shapes)}[self.tuner.kind]
        return 1, self._monotone_end(cfg, spec, hi)

    def _monotone_end(self, cfg, spec, hi: int) -> int:
        """The last knob value up to which the one-layer count never drops: every value when there are at most
        512 (rank-like knobs), else ``hi`` (the count is checked on a spread of values by ``_check_monotone``)."""
        if hi > 512:
            return hi
        key = ("end", cfg.model_dump_json(exclude={self.knob}), spec.name, spec.hidden, hi)
        if key not in self._counts:
            end, last = hi, -1
            for k in range(1, hi + 1):
                count = self._count(self.config(cfg, **{self.knob: k}), spec, layers=1)
                if count < last:
                    end = k - 1
                    break
                last = count
            self._counts[key] = end
        return self._counts[key]

    def knob_values(self, cfg, spec):
        if self.tuner.kind != "block":
            return None
        key = ("values", cfg.model_dump_json(exclude={self.knob}), spec.name, spec.hidden)
        if key not in self._counts:
            modules, _ = self._plan(cfg, spec)
            width = math.gcd(*(s[0] for s in modules.values()))
            accepted = []
            for b in (d for d in range(1, width + 1) if width % d == 0):
                try:  # what peft accepts on one layer (BOFT: even sizes, butterfly factors that fit)
                    self._count(self.config(cfg, **{self.knob: b}), spec, layers=1)
                    accepted.append(b)
                except peftbench.ConfigError:
                    pass
            if not accepted:
                raise peftbench.ConfigError(f"method {self.name!r}: peft accepts no {self.knob} on {spec.name} "
                                            f"(tried the divisors of {width})")
            self._counts[key] = accepted
        return self._counts[key]

    def _check_monotone(self, cfg, spec) -> None:
        """``param_count`` non-decreasing in the knob, checked on up to 9 knob values spread log-evenly."""
        if not self.knob:
            return
        key = (cfg.model_dump_json(exclude={self.knob}), spec.name, spec.hidden, spec.layers)
        if key in self._checked:
            return
        self._checked.add(key)
        values = self.knob_values(cfg, spec)
        if values is None:
            lo, hi = self.knob_range(cfg, spec)
            values = sorted({round(lo * (hi / lo) ** (i / 8)) for i in range(9)})
        else:
            values = sorted({values[round(i * (len(values) - 1) / 8)] for i in range(9)})
        counts = [self._count(self.config(cfg, **{self.knob: v}), spec) for v in values]
        for (a, ca), (b, cb) in zip(zip(values, counts), zip(values[1:], counts[1:])):
            if cb < ca:
                raise peftbench.ConfigError(f"method {self.name!r}: param_count is not monotone in {self.knob} on "
                                            f"{spec.name}: {self.knob}={a} gives {ca:,}, {self.knob}={b} gives {cb:,}; "
                                            "the budget solver cannot search it")

    def check(self, cfg, spec):
        super().check(cfg, spec)
        self._count(cfg, spec, layers=1)  # peft's own checks (options, sizes) fail here, with the method's name

    # -- building ----------------------------------------------------------------------------
    def inject(self, backbone, cfg):
        injection = (AdaLoraInjection if self.tuner.name == "adalora" else BridgeInjection)(backbone, self, cfg)
        sites = _target_sites(self.name, cfg.targets, backbone.spec, self.tuner.norms)
        ff_names = set(getattr(cfg, "feedforward", [])) & set(sites)
        targets: dict[str, peftbench.Site] = {}
        for name in sites:
            for site in backbone.sites(name):
                targets.setdefault(site.path, site)  # the slices of a fused module: one target
        ff = sorted({s.path for n in ff_names for s in backbone.sites(n)})
        conv1d = any(peftbench.is_conv1d(s.module) for s in targets.values())
        peft_cfg = self.peft_config(cfg, list(targets), ff, fan_in_fan_out=conv1d)
        model = backbone.model
        head = [p for p in backbone.head_parameters().values() if p.requires_grad]
        attributes = set(vars(model))
        _, tuners = _peft()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tuner_model = tuners[peft_cfg.peft_type](model, peft_cfg, adapter_name=ADAPTER)
        except Exception as exc:  # peft has no layer for a module type (GPT-2's Conv1D for LoHa, OFT, ...)
            for site in targets.values():  # whatever peft replaced before it stopped goes back
                setattr(site.parent, site.attr, site.module)
            for attr in set(vars(model)) - attributes:
                delattr(model, attr)
            kinds = sorted({type(s.module).__name__ for s in targets.values()})
            raise peftbench.ConfigError(f"method {self.name!r}: peft cannot put its layers on {backbone.spec.name} "
                                        f"({backbone.spec.model_type}, target modules of type {', '.join(kinds)}): "
                                        f"{type(exc).__name__}: {exc}") from None
        for attr in set(vars(model)) - attributes:  # peft copies its config onto the model: not ours to leave
            delattr(model, attr)
        for p in head:  # peft freezes everything but its adapters; the task head trains with every method
            p.requires_grad_(True)
        for site in targets.values():
            layer = getattr(site.parent, site.attr)
            setattr(site.parent, site.attr, site.module)  # back, so that replace() records the original
            owned = {n: getattr(layer, n) for n in layer.adapter_layer_names
                     if isinstance(getattr(layer, n, None), nn.Module) and ADAPTER in getattr(layer, n)}
            injection.replace(site.parent, site.attr, layer, owned=owned)
            injection.tuner_layers.append(layer)
        if isinstance(injection, AdaLoraInjection):
            injection.tuner_model = tuner_model
            injection.start()
        return injection


@peftbench.hookimpl
def register_methods(register):
    try:
        import peft  # noqa: F401  (a dependency of peftbench; absent only after an install with --no-deps)
    except ImportError:
        return  # no peft, no peft:<tuner> methods; the rest of peftbench works without them
    for tuner in TUNERS:
        register(PeftMethod(tuner))
    from .peft_prompts import register as register_prompts  # peft's prompt-learning tuners

    register_prompts(register)
