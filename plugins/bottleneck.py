"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) as forward hooks on sites.

A bottleneck maps a site's output h (width d) to h + W_up act(W_down h + b_down) + b_up with
W_down: (m, d), W_up: (d, m). It sits on a sub-layer's output projection, before the block's
residual add and LayerNorm:

- ``houlsby`` (aliases ``adapter``, ``bottleneck``): after ``attn_out`` and ``ffn_out`` of
  every layer, and trains the block's LayerNorms (``attn_norm``, ``ffn_norm``);
- ``pfeiffer``: after ``ffn_out`` only, LayerNorms frozen by default.

Size: ``m`` directly, or ``reduction_factor`` (m = d // reduction_factor); setting both is an
error. When neither is set, reduction_factor 16 applies (the adapters library's default).
When the budget solver sets ``m`` it clears ``reduction_factor``: the solver's m wins.

``Bottleneck`` is reusable: ``from peftbench_plugins.bottleneck import Bottleneck``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import peftbench

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
NonLinearity = Literal["relu", "gelu", "swish", "silu", "tanh"]
DEFAULT_REDUCTION = 16
NORM_SITES = ("attn_norm", "ffn_norm")


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))): down d->m, up m->d; near identity at init.

    ``init="zeros"`` makes the up-projection zero (exact identity at init), ``"normal"``
    draws it like the down-projection: normal(0, init_scale). Biases start at zero.
    """

    def __init__(self, d: int, m: int, non_linearity: str = "relu", init: str = "zeros",
                 init_scale: float = 1e-3, device=None, dtype=None):
        super().__init__()
        if not 1 <= m:
            raise peftbench.ConfigError(f"Bottleneck: field 'm' = {m} must be >= 1")
        if non_linearity not in ACTIVATIONS:
            raise peftbench.ConfigError(
                f"Bottleneck: field 'non_linearity' = {non_linearity!r} is unknown; allowed: {', '.join(ACTIVATIONS)}"
            )
        if init not in ("zeros", "normal"):
            raise peftbench.ConfigError(f"Bottleneck: field 'init' = {init!r}; allowed: zeros, normal")
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_scale)
            nn.init.zeros_(self.down.bias)
            if init == "normal":
                nn.init.normal_(self.up.weight, std=init_scale)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to h: W_up act(W_down h + b_down) + b_up."""
        return self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


def _adapt(adapter: Bottleneck):
    """A forward hook that replaces a site's output h with h + adapter.delta(h)."""

    def hook(module, args, output):
        return output + adapter.delta(output)

    return hook


def _placement(module: nn.Module) -> dict:
    """Device and dtype for new parameters next to ``module`` (first floating parameter)."""
    for p in module.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    first = next(module.parameters(), None)
    return {"device": first.device if first is not None else None, "dtype": None}


class BottleneckConfig(peftbench.MethodConfig):
    m: int | None = Field(None, ge=1, description="bottleneck width (the knob); default d // reduction_factor")
    reduction_factor: int | None = Field(None, ge=1, description="m = d // reduction_factor (instead of m)")
    non_linearity: NonLinearity = "relu"
    init: Literal["zeros", "normal"] = "zeros"
    init_scale: float = Field(1e-3, gt=0, le=1e-2, description="std of the normal init (Houlsby: robust below 1e-2)")
    train_layer_norms: bool = False
    layers: list[int] | None = Field(None, min_length=1, description="layer indices to adapt; default all")

    @model_validator(mode="after")
    def _one_size(self):
        if self.m is not None and self.reduction_factor is not None:
            raise ValueError(f"set either 'm' ({self.m}) or 'reduction_factor' ({self.reduction_factor}), not both")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"'layers' lists a layer twice: {self.layers}")
        return self


class HoulsbyConfig(BottleneckConfig):
    non_linearity: NonLinearity = "swish"
    train_layer_norms: bool = True


class _BottleneckMethod(peftbench.Method):
    knob = "m"
    default_lr = 1e-3
    Config = BottleneckConfig
    #: the sites that get an adapter on their output, in every adapted layer
    sites: ClassVar[tuple[str, ...]] = ()

    # -- sizes -----------------------------------------------------------------------------
    def width(self, cfg: BottleneckConfig, spec: peftbench.BackboneSpec) -> int:
        """The bottleneck m: ``m`` if set, else d // reduction_factor (default 16)."""
        if cfg.m is not None:
            return cfg.m
        return spec.hidden // (cfg.reduction_factor or DEFAULT_REDUCTION)

    def layer_indices(self, cfg: BottleneckConfig, spec: peftbench.BackboneSpec) -> list[int]:
        return list(range(spec.layers)) if cfg.layers is None else list(cfg.layers)

    def knob_range(self, cfg, spec):
        return 1, spec.hidden

    def with_knob(self, cfg, value):
        # the solver's m replaces a reduction_factor (setting both is otherwise an error)
        return self.config(cfg, m=int(value), reduction_factor=None)

    def check(self, cfg, spec):
        for site in (*self.sites, *(NORM_SITES if cfg.train_layer_norms else ())):
            if not spec.has_site(site):
                raise peftbench.ConfigError(f"method {self.name!r}: backbone {spec.name} has no site {site!r}")
        d, m = spec.hidden, self.width(cfg, spec)
        if cfg.m is None and m < 1:
            raise peftbench.ConfigError(
                f"method {self.name!r}: field 'reduction_factor' = {cfg.reduction_factor} gives m = {d} // "
                f"{cfg.reduction_factor} = 0 on {spec.name}; allowed reduction_factor 1..{d}"
            )
        if not 1 <= m <= d:
            raise peftbench.ConfigError(
                f"method {self.name!r}: field 'm' = {m} is out of range on {spec.name} (allowed 1..{d})"
            )
        bad = [i for i in cfg.layers or () if not 0 <= i < spec.layers]
        if bad:
            raise peftbench.ConfigError(
                f"method {self.name!r}: field 'layers' has {bad}, not layers of {spec.name} (allowed 0..{spec.layers - 1})"
            )

    def param_count(self, cfg, spec):
        # per adapter: down d*m + m, up m*d + d  ->  2*d*m + m + d
        # total: |layers| * (|sites| * (2*d*m + m + d) + [trained] sum of the block's LayerNorm params)
        self.check(cfg, spec)
        d, m = spec.hidden, self.width(cfg, spec)
        per_layer = len(self.sites) * (2 * d * m + m + d)
        if cfg.train_layer_norms:
            per_layer += sum(spec.norm_params.get(name, 0) for name in NORM_SITES)
        return len(self.layer_indices(cfg, spec)) * per_layer

    # -- building --------------------------------------------------------------------------
    def inject(self, backbone, cfg):
        cfg = self.config(cfg)
        spec = backbone.spec
        self.check(cfg, spec)
        d, m = spec.hidden, self.width(cfg, spec)
        injection = peftbench.Injection(backbone, self, cfg)
        blocks = backbone.layer_modules()
        for i in self.layer_indices(cfg, spec):
            for name in self.sites:
                site = backbone.site(i, name)
                adapter = Bottleneck(d, m, cfg.non_linearity, cfg.init, cfg.init_scale, **_placement(site.module))
                injection.attach(blocks[i], f"{self.name}_{name}", adapter)
                injection.add_hook(site.module, _adapt(adapter))
            if cfg.train_layer_norms:
                for name in NORM_SITES:
                    site = backbone.site(i, name)
                    injection.train_base({f"{site.path}.{p}": param for p, param in site.module.named_parameters()})
        return injection


class Houlsby(_BottleneckMethod):
    name = "houlsby"
    aliases = ("adapter", "bottleneck")
    inserts = "bottleneck adapter (d->m->d, skip) on attn_out and ffn_out of each layer; trains the LayerNorms"
    Config = HoulsbyConfig
    sites = ("attn_out", "ffn_out")


class Pfeiffer(_BottleneckMethod):
    name = "pfeiffer"
    inserts = "bottleneck adapter (d->m->d, skip) on ffn_out of each layer"
    Config = BottleneckConfig
    sites = ("ffn_out",)


@peftbench.hookimpl
def register_methods(register):
    register(Houlsby)
    register(Pfeiffer)
