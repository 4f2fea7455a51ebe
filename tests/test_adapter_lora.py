"""adapter_lora: exact counts, the rank rule, monotone sizes, identity at init, both paths train."""

from __future__ import annotations

import pytest
import torch

import peftbench
from conftest import ARCHS, assert_same_step, batch_for, fused_and_module_steps, tiny_backbone
from peftbench_plugins.bottleneck import Bottleneck
from peftbench.blocks import LoRALinear

METHOD = peftbench.get_registry().method("adapter_lora")


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_exact_for_several_m_and_splits(arch):
    backbone = tiny_backbone(arch)
    for split in (0.2, 0.5, 0.8):
        for m in (1, 4, 17, 32):
            cfg = METHOD.config(m=m, split=split)
            assert peftbench.measure(METHOD, backbone, cfg) == METHOD.param_count(cfg, backbone.spec)


def test_rank_rule_by_hand():
    """d = 32, L = 2, targets q, v: P(m) = 2*32*m + m + 32; S = (32+32) * 2 = 128 (bert) or
    64 + 48 = 112 (llama, v is GQA 32 -> 16). r = nearest integer to ((1-split)/split) P / S."""
    bert = tiny_backbone("bert").spec
    cfg = METHOD.config(m=4)  # P = 292, r = round(292 / 128 = 2.28) = 2
    assert METHOD.rank(cfg, bert) == 2
    assert METHOD.param_count(cfg, bert) == 2 * (292 + 2 * 128)
    cfg = METHOD.config(m=4, split=0.25)  # r = round(3 * 292 / 128 = 6.84) = 7
    assert METHOD.rank(cfg, bert) == 7 and METHOD.param_count(cfg, bert) == 2 * (292 + 7 * 128)
    assert METHOD.rank(METHOD.config(m=1, split=0.9), bert) == 1  # at least 1: both paths exist
    assert METHOD.rank(METHOD.config(m=32, split=0.05), bert) == 32  # at most min(d_in, d_out)
    llama = tiny_backbone("llama").spec
    cfg = METHOD.config(m=8)  # P = 552, r = round(552 / 112 = 4.93) = 5
    assert METHOD.rank(cfg, llama) == 5 and METHOD.param_count(cfg, llama) == 2 * (552 + 5 * 112)


@pytest.mark.parametrize("split", [0.1, 0.5, 0.9])
def test_count_non_decreasing_in_m_and_split_respected(split):
    spec = peftbench.spec_for("minilm", registry=peftbench.get_registry())
    lo, hi = METHOD.knob_range(METHOD.config(), spec)
    counts = [METHOD.param_count(METHOD.config(m=m, split=split), spec) for m in range(lo, hi + 1)]
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    cfg = METHOD.config(m=64, split=split)  # a size where rounding r matters little
    adapter = spec.layers * (2 * 384 * 64 + 64 + 384)
    assert adapter / METHOD.param_count(cfg, spec) == pytest.approx(split, abs=0.02)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_then_both_paths_get_gradients(arch):
    backbone = tiny_backbone(arch)
    batch = batch_for(backbone)
    ref = backbone.model(**batch, output_hidden_states=True).hidden_states[-1]
    injection = peftbench.apply(METHOD, backbone, METHOD.config(m=4))
    out = backbone.model(**batch, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    adapters = [m for m in backbone.model.modules() if isinstance(m, Bottleneck)]
    loras = [m for m in backbone.model.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2 and len(loras) == (2 if arch == "gpt2" else 4)  # gpt2: q, v share c_attn
    # the zero-initialised halves get gradients at init; give them values so all four do
    loss = backbone.model(**batch, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)
    assert all(lo.lora_B.weight.grad.abs().sum() > 0 for lo in loras)
    with torch.no_grad():
        for p in injection.named_parameters().values():
            if p.dim() == 2:  # weights only: perturbed biases can switch off a tiny model's ReLUs
                p.add_(torch.randn_like(p) * 0.05)
    backbone.model.zero_grad()
    backbone.model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    for p in (*[a.down.weight for a in adapters], *[lo.lora_A.weight for lo in loras]):
        assert p.grad.abs().sum() > 0
    injection.remove()
    assert not any(isinstance(m, (Bottleneck, LoRALinear)) for m in backbone.model.modules())


def test_adapter_sees_lora_output_when_ffn_out_is_a_target():
    """With ffn_out among LoRA's targets the adapter hooks the wrapper, so it adapts W x + B A x."""
    backbone = tiny_backbone("bert")
    injection = peftbench.apply(METHOD, backbone, METHOD.config(m=4, targets=["q", "v", "ffn_out"]))
    site = backbone.site(0, "ffn_out")
    assert isinstance(site.module, LoRALinear) and len(site.module._forward_hooks) == 1
    assert len(site.module.base_layer._forward_hooks) == 0
    injection.remove()
    assert len(backbone.site(0, "ffn_out").module._forward_hooks) == 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fused_adapter_equals_module_path(arch):
    """The hook calls the adapter module, so its fused node runs; outputs and every gradient
    (adapter and LoRA) match the module path's (h + adapter.delta(h)), in float32."""
    backbone = tiny_backbone(arch)
    batch = batch_for(backbone)
    injection = peftbench.apply(METHOD, backbone, METHOD.config(m=4, non_linearity="gelu", targets=["q", "v", "ffn_out"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in injection.named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapters = [m for m in backbone.model.modules() if isinstance(m, Bottleneck)]
    nodes = []
    handles = [s.module.register_forward_hook(lambda mod, a, out: nodes.append(type(out.grad_fn).__name__))
               for s in backbone.sites("ffn_out")]  # after inject: sees the adapted output

    def check(fused):
        assert (set(nodes) == {"_FusedBottleneckBackward"}) if fused else ("_FusedBottleneckBackward" not in nodes)
        nodes.clear()

    forward = lambda: backbone.model(**batch, output_hidden_states=True).hidden_states[-1]  # noqa: E731
    assert_same_step(fused_and_module_steps(backbone, injection, adapters, forward, check))
    for handle in handles:
        handle.remove()
