"""P-tuning v2 (Liu et al. 2022): deep prompts, n trained key/value vectors at every layer.

Unlike prefix tuning there is no reparameterisation: the (L, 2, kv_heads, n, head_dim)
tensor is the trained parameter, fed to every attention layer through the core's
key/value-prefix mechanism; classification comes from the backbone's task head (the paper
drops the verbalizer). GQA models get ``kv_heads`` prefix heads, not attention heads.
"""

from __future__ import annotations

from pydantic import Field

import peftbench

from .prefix import PrefixInjection, PrefixTable, attach_prefix, kv_prefix_knob_range


class PTuningV2(peftbench.Method):
    name = "ptuning_v2"
    aliases = ("p-tuning-v2", "ptuningv2")
    knob = "n"
    inserts = "n trained key/value vectors per attention layer (deep prompts, no reparameterisation)"
    default_lr = 5e-3
    schedule_lr = 1e-1  # (1e-2: 0.460, 3e-2: 0.640, 1e-1: 0.650)

    per_layer_sizes = False  # one prompt length in every chosen layer (``layers``)

    class Config(peftbench.PerLayerConfig):
        n: int = Field(20, ge=1, description="virtual tokens (prompt length at every layer)")

    def knob_range(self, cfg, spec):
        return kv_prefix_knob_range(spec)

    def param_count(self, cfg, spec):
        # L · 2 · n · kv_dim (kv_dim = kv_heads · head_dim), L chosen layers
        return len(self.layer_indices(cfg, spec)) * 2 * cfg.n * spec.kv_dim

    def inject(self, backbone, cfg):
        injection = PrefixInjection(backbone, self, cfg)
        injection.table = attach_prefix(injection, PrefixTable(backbone.spec, cfg.n, hidden=None,
                                                              layers=self.layer_indices(cfg, backbone.spec)))
        return injection


@peftbench.hookimpl
def register_methods(register):
    register(PTuningV2)
