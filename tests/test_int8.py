"""INT8 adapters: torch's dynamic int8 quantisation of a method's own linears, its sizes and outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone, tiny_batch

import peftbench
from peftbench.using.int8 import method_linears, quantize_method


def _trained(backbone, name, **cfg):
    method = peftbench.get_registry().method(name)
    injection = peftbench.apply(method, backbone, method.config(**cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" method: its weights away from their (partly zero) initialisation
        for p in backbone.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return injection


@pytest.mark.parametrize("name,cfg,suffixes", [
    ("lora", {"r": 4}, ("lora_A", "lora_B")),
    ("houlsby", {"m": 8}, ("down", "up")),
    ("adapter_lora", {"m": 4}, ("lora_A", "lora_B", "down", "up")),
])
def test_quantises_only_the_methods_linears_and_keeps_the_outputs_close(name, cfg, suffixes):
    backbone = tiny_backbone("bert")
    _trained(backbone, name, **cfg)
    names = method_linears(backbone)
    assert names and all(n.rsplit(".", 1)[1] in suffixes for n in names)
    head = set(backbone.head_parameters())
    assert not any(n.startswith(h.rsplit(".", 1)[0]) for n in names for h in head)
    batch = tiny_batch()
    backbone.model.eval()
    with torch.no_grad():
        before = backbone.model(**batch).logits
    count = backbone.count_trainable()
    fp32, int8, quantized = quantize_method(backbone)
    assert quantized == names
    modules = dict(backbone.model.named_modules())
    assert all(type(modules[n]).__name__ == "Linear" and modules[n].__module__.startswith("torch.ao") for n in names)
    assert fp32 == 4 * count and fp32 / 4 < int8 < fp32 / 2  # int8 weights; fp32 biases, scales, LayerNorms
    with torch.no_grad():
        after = backbone.model(**batch).logits
    assert not torch.equal(before, after)  # the int8 weights are really used
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)


def test_a_method_without_linears_is_left_fp32():
    backbone = tiny_backbone("bert")
    _trained(backbone, "ptuning_v2", n=3)
    assert method_linears(backbone) == []
    fp32, int8, names = quantize_method(backbone)
    assert fp32 == int8 == 4 * backbone.count_trainable() and names == []
