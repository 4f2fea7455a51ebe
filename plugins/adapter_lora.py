"""adapter_lora: a bottleneck adapter path and a LoRA path in one method, their updates summed.

- adapter path: a Pfeiffer-placed bottleneck on ``ffn_out`` of every layer,
  h -> h + W_up act(W_down h + b_down) + b_up (``Bottleneck`` from the bottleneck plugin);
- LoRA path: (alpha / r) B A beside the target linears (default q, v), as in ``lora``.

Both add to the block's residual stream. The knob is the bottleneck width ``m``; ``split``
is the fraction of the budget the adapter path gets, and the LoRA rank follows from it.
"""

from __future__ import annotations

import math
from typing import Literal

import peftbench
from pydantic import Field, field_validator

from peftbench_plugins.bottleneck import Bottleneck, NonLinearity
from peftbench_plugins.lora import LoRAInjection, add_lora, lora_params, max_rank, target_names, validate_targets

ADAPTER_SITE = "ffn_out"


class AdapterLoRA(peftbench.Method):
    """Bottleneck adapter on ffn_out (width m) + LoRA on the targets (rank r derived from m).

    Per layer the adapter has P(m) = 2·d·m + m + d parameters and LoRA has r·S, with
    S = sum over targets of (d_in + d_out). The rank is the integer nearest to
    ((1 - split) / split) · P(m) / S, at least 1 and at most min(d_in, d_out) over targets:

        r(m) = min(r_max, max(1, floor(ratio · P(m) / S + 1/2))),  ratio = (1 - split) / split
        param_count(m) = L · (P(m) + r(m) · S)

    so LoRA's share is ≈ (1 - split) of the total and the count is exact and
    non-decreasing in m (P and r are). ``split=0.5`` gives the two paths about equal sizes.
    """

    name = "adapter_lora"
    knob = "m"
    inserts = "bottleneck adapter on ffn_out (width m) + LoRA on the targets, rank derived from split"
    default_lr = 5e-4
    schedule_lr = 5e-3  # (2e-3: 0.645, 5e-3: 0.805, 1e-2: 0.785)

    class Config(peftbench.PerLayerConfig):
        m: int = Field(16, ge=1, description="bottleneck width of the adapter path (the knob; per chosen layer "
                                             "unless layer_sizes)")
        split: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the parameters in the adapter path")
        non_linearity: NonLinearity = Field("relu", description="activation inside the adapter's bottleneck")
        alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: (alpha / r) B A")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA path's input")
        targets: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q", "v"], description="linear sites to adapt (q, k, v, attn_out, ffn_in, ffn_gate, ffn_out) or all-linear")

        _targets = field_validator("targets", mode="before")(validate_targets)

    # -- sizes -----------------------------------------------------------------------------
    def rank(self, cfg, spec: peftbench.BackboneSpec, m: int | None = None) -> int:
        """LoRA rank r(m) (see the class docstring) at width ``m`` (default: ``cfg.m``)."""
        names = target_names(self.name, cfg.targets, spec)
        per_rank = lora_params({0: 1}, names, spec)  # S
        ratio = (1.0 - cfg.split) / cfg.split
        r = math.floor(ratio * adapter_params(cfg.m if m is None else m, spec.hidden) / per_rank + 0.5)
        return min(max_rank(names, spec), max(1, r))

    def knob_range(self, cfg, spec):
        return 1, spec.hidden

    def check(self, cfg, spec):
        if not spec.has_site(ADAPTER_SITE):
            raise peftbench.ConfigError(f"method {self.name!r}: backbone {spec.name} has no site {ADAPTER_SITE!r}")
        super().check(cfg, spec)

    def param_count(self, cfg, spec):
        # sum over chosen layers i of (2*d*m_i + m_i + d) + r(m_i) * sum over targets (d_in + d_out)
        self.check(cfg, spec)
        names = target_names(self.name, cfg.targets, spec)
        widths = self.layer_knobs(cfg, spec)
        ranks = {i: self.rank(cfg, spec, m) for i, m in widths.items()}
        return sum(adapter_params(m, spec.hidden) for m in widths.values()) + lora_params(ranks, names, spec)

    def identity_at_init(self, cfg):
        return True  # the adapter's up-projection and LoRA's B start at zero

    # -- building --------------------------------------------------------------------------
    def inject(self, backbone, cfg):
        spec = backbone.spec
        injection = LoRAInjection(backbone, self, cfg)
        widths = self.layer_knobs(cfg, spec)
        add_lora(injection, target_names(self.name, cfg.targets, spec),
                 {i: self.rank(cfg, spec, m) for i, m in widths.items()}, cfg.alpha, cfg.dropout)
        blocks = backbone.layer_modules()
        for site in backbone.sites(ADAPTER_SITE):  # resolved after LoRA: hooks the wrapper if ffn_out is a target
            if site.layer not in widths:
                continue
            weight = next(p for p in site.module.parameters() if p.is_floating_point())
            adapter = Bottleneck(spec.hidden, widths[site.layer], cfg.non_linearity, device=weight.device,
                                 dtype=weight.dtype)
            injection.attach(blocks[site.layer], f"{self.name}_{ADAPTER_SITE}", adapter)
            injection.add_hook(site.module, lambda module, args, h, adapter=adapter: adapter(h))  # h + delta(h)
        return injection


def adapter_params(m: int, d: int) -> int:
    # down d*m + m, up m*d + d
    return 2 * d * m + m + d


@peftbench.hookimpl
def register_methods(register):
    register(AdapterLoRA)
