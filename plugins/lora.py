"""LoRA (Hu et al., 2021): a trainable low-rank update beside frozen linear layers.

    h = W x + (alpha / r) * B A x        A: (r, d_in) kaiming-uniform, B: (d_out, r) zero

so the model is unchanged at initialisation. Each target linear site is replaced by a
``LoRALinear`` that keeps the original as ``base_layer``. On GPT-2's fused ``c_attn``
(a Conv1D producing q|k|v) the targets are output slices: every targeted slice of one
fused module shares one ``SlicedLoRALinear`` and its delta lands only in its slice. The layers
and the target helpers are public building blocks of the core (``peftbench.blocks``), which
this plugin uses as a third party would.
"""

from __future__ import annotations

from typing import Literal

import peftbench
from peftbench.blocks import (  # noqa: F401  (re-exported for qlora, adapter_lora)
    ALL_LINEAR,
    LoRAInjection,
    LoRALinear,
    SlicedLoRALinear,
    add_lora,
    max_rank,
    target_names,
    validate_targets,
)
from pydantic import Field, field_validator


def lora_params(r: int | dict[int, int], names: list[str], spec: peftbench.BackboneSpec) -> int:
    """LoRA's parameters with rank ``r`` in every layer, or ``{layer: rank}`` in those layers only."""
    # per layer and target: r * (d_in + d_out)   (GQA k/v: d_out = kv_heads * head_dim)
    ranks = dict.fromkeys(range(spec.layers), r) if isinstance(r, int) else r
    return sum(ranks.values()) * sum(spec.site_shapes[n][0] + spec.site_shapes[n][1] for n in names)


class LoRA(peftbench.Method):
    name = "lora"
    knob = "r"
    inserts = "low-rank update (alpha/r)·B·A beside frozen target linears (default q, v); mergeable"
    default_lr = 5e-4
    schedule_lr = 5e-3  # (2e-3: 0.520, 5e-3: 0.805, 1e-2: 0.795)

    class Config(peftbench.PerLayerConfig):
        r: int = Field(8, ge=1, description="rank of B A (in every chosen layer unless layer_sizes)")
        alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA path's input")
        targets: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q", "v"], description="linear sites to adapt (q, k, v, attn_out, ffn_in, ffn_gate, ffn_out) or all-linear")

        _targets = field_validator("targets", mode="before")(validate_targets)

    def knob_range(self, cfg, spec):
        return 1, max_rank(target_names(self.name, cfg.targets, spec), spec)

    def param_count(self, cfg, spec):
        # sum over chosen layers of r_i * sum over targets of (d_in + d_out)
        return lora_params(self.layer_knobs(cfg, spec), target_names(self.name, cfg.targets, spec), spec)

    mergeable = True  # merge() folds (alpha / r) B A into each target's weight: nothing else remains

    def identity_at_init(self, cfg):
        return True  # B starts at zero: the update is zero until trained

    def inject(self, backbone, cfg):
        injection = LoRAInjection(backbone, self, cfg)
        add_lora(injection, target_names(self.name, cfg.targets, backbone.spec), self.layer_knobs(cfg, backbone.spec),
                 cfg.alpha, cfg.dropout)
        return injection

    def peft_adapter(self, injection):
        return peft_lora(injection, injection.lora_layers)


def peft_lora(injection, layers: list[LoRALinear], quantized_base: bool = False) -> peftbench.PeftAdapter | None:
    """LoRA wrappers in peft's format: one ``lora_A``/``lora_B`` per target module (its full path).

    A fused projection whose slices have their own LoRA (GPT-2's q|k|v) becomes one peft LoRA of rank
    n r: A stacks the n slices' A_i (already so stored), B is block-structured, slice i's rows (its
    output columns) holding B_i in columns i r:(i+1) r, zeros elsewhere; its alpha is n alpha so
    peft's alpha / rank stays alpha / r. None when a base is 4-bit (peft's LoRA would sit on fp weights)
    unless ``quantized_base``: the caller exports the 4-bit base with it (QLoRA).
    """
    paths = {id(module): name for name, module in injection.backbone.model.named_modules()}
    cfg = injection.config
    tensors, targets, ranks, alphas, conv1d = {}, [], {}, {}, set()
    for layer in layers:
        if peftbench.quant.is_4bit(layer.base_layer) and not quantized_base:
            return None
        path = paths[id(layer)]
        targets.append(path)
        conv1d.add(peftbench.is_conv1d(layer.base_layer))
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if layer.slices:
            n, r = len(layer.slices), layer.r
            d_out = peftbench.linear_shape(layer.base_layer)[1]
            full = b.new_zeros(d_out, n * r)  # (d_out, n r)
            for i, ((start, end), (lo, hi)) in enumerate(zip(layer.slices, layer.b_rows())):
                full[start:end, i * r:(i + 1) * r] = b[lo:hi]
            b = full
            ranks[path], alphas[path] = n * r, n * cfg.alpha
        elif layer.r != cfg.r:  # a per-layer rank (layer_sizes): peft's scaling alpha / r follows it
            ranks[path] = layer.r
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.clone()
    if len(conv1d) > 1:
        return None  # peft's fan_in_fan_out is one flag for every target
    config = {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": targets, "fan_in_fan_out": conv1d == {True}, "bias": "none",
              "rank_pattern": ranks, "alpha_pattern": alphas}
    return peftbench.PeftAdapter(config, tensors)


@peftbench.hookimpl
def register_methods(register):
    register(LoRA)
