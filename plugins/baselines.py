"""Baselines: full fine-tuning, the task head alone (the floor), and the top k layers.

``full`` and ``head`` ignore the budget (the report says so); ``topk`` is budget-solved on
its knob k, the "traditional transfer learning" curve of Houlsby et al. (2019), Fig. 2.
"""

from __future__ import annotations

from pydantic import Field

import peftbench


class FullConfig(peftbench.MethodConfig):
    pass


class Full(peftbench.Method):
    name = "full"
    inserts = "nothing: every backbone parameter is trained"
    Config = FullConfig
    aliases = ("full-ft", "finetune")
    default_lr = 5e-5
    schedule_lr = 2e-4  # (5e-5: 0.480, 1e-4: 0.780, 2e-4: 0.795)
    reference = "ceiling"  # the reference the report measures against: the zero of its relative plot
    budgeted = False
    mergeable = True  # it trains the backbone's own weights: the trained model is a plain checkpoint

    def identity_at_init(self, cfg):
        return True  # it adds nothing, it unfreezes

    def param_count(self, cfg, spec) -> int:
        return spec.base_params  # the whole backbone, head excluded

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        head = {id(p) for p in backbone.head_parameters().values()}
        seen: set[int] = set()
        params = {}
        for name, p in backbone.model.named_parameters():
            if id(p) not in head and id(p) not in seen:
                seen.add(id(p))
                params[name] = p
        injection.train_base(params)
        return injection


class HeadConfig(peftbench.MethodConfig):
    pass


class Head(peftbench.Method):
    name = "head"
    inserts = "nothing: only the task head is trained (the floor)"
    Config = HeadConfig
    aliases = ("linear-probe", "head-only")
    default_lr = 1e-3
    schedule_lr = 3e-2  # (3e-3: 0.460, 1e-2: 0.470, 3e-2: 0.540) the head alone stays near chance in 50 steps
    reference = "floor"
    budgeted = False
    mergeable = True  # only the head changes: a plain checkpoint

    def identity_at_init(self, cfg):
        return True  # it adds nothing

    def param_count(self, cfg, spec) -> int:
        return 0

    def inject(self, backbone, cfg):
        return peftbench.Injection(backbone, self, cfg)


class TopKConfig(peftbench.MethodConfig):
    k: int = Field(1, ge=1, description="number of top transformer blocks to train")


class TopK(peftbench.Method):
    name = "topk"
    knob = "k"
    inserts = "nothing: the top k transformer blocks are trained"
    Config = TopKConfig
    aliases = ("top-k",)
    default_lr = 1e-4
    in_default_grid = False  # optional: run it with --methods ...,topk
    mergeable = True  # it trains the backbone's own weights: the trained model is a plain checkpoint

    def identity_at_init(self, cfg):
        return True  # it adds nothing, it unfreezes

    def knob_range(self, cfg, spec):
        return 1, spec.layers

    def param_count(self, cfg, spec) -> int:
        return cfg.k * spec.layer_params  # k identical blocks

    def inject(self, backbone, cfg):
        injection = peftbench.Injection(backbone, self, cfg)
        layers = backbone.layer_modules()
        first = len(layers) - cfg.k
        params = {}
        for i in range(first, len(layers)):
            for name, p in layers[i].named_parameters():
                params[f"{backbone.layer_path(i)}.{name}"] = p
        injection.train_base(params)
        return injection


@peftbench.hookimpl
def register_methods(register):
    register(Full)
    register(Head)
    register(TopK)
