"""LoRA: parity with peft, identity at init, merge/unmerge, counts, fused GPT-2 slices, GQA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peftbench
from conftest import ARCHS, copy_lora_into_peft, assert_same_step, batch_for, fused_and_module_steps, tiny_backbone
from peftbench.blocks import LoRALinear, SlicedLoRALinear

LORA = peftbench.get_registry().method("lora")
TARGETS = (["q", "v"], ["q", "k", "v"], "all-linear")


def hidden(backbone, batch):
    return backbone.model(**batch, output_hidden_states=True).hidden_states[-1]


def wrappers(backbone) -> dict[str, LoRALinear]:
    return {name: m for name, m in backbone.model.named_modules() if isinstance(m, LoRALinear)}


def randomize(injection, seed=0, std=0.3):
    """Nonzero A and B, so the LoRA path really changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in injection.named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("targets", TARGETS, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_match_peft(arch, targets):
    """Same base weights, same A and B: our model and peft's agree within 1e-5.

    A fused GPT-2 wrapper with n targeted slices is one peft LoRA of rank n*r on the whole
    c_attn (alpha scaled by n so alpha/r is unchanged): A' = our stacked A (n*r, d_in) and
    B' (3*w, n*r) holds B_i in slice i's rows and columns i*r:(i+1)*r, zeros elsewhere.
    """
    r, alpha = 2, 6.0
    ours, theirs = tiny_backbone(arch), tiny_backbone(arch)
    # float64: with A, B this large a 2-layer model amplifies float32 rounding to ~1e-5, and which
    # order of the same sums is right is not the question; in float64 both agree to ~1e-12
    ours.model.double(), theirs.model.double()
    batch = batch_for(ours)
    base_out = hidden(ours, batch)
    injection = peftbench.apply(LORA, ours, LORA.config(r=r, alpha=alpha, targets=targets))
    randomize(injection)
    mine = wrappers(ours)
    ranks = {path: r * len(w.slices) for path, w in mine.items() if w.slices}
    peft_model = get_peft_model(theirs.model, LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(mine), lora_dropout=0.0, fan_in_fan_out=arch == "gpt2",
        rank_pattern=ranks, alpha_pattern={path: alpha * n / r for path, n in ranks.items()}))
    copy_lora_into_peft(mine, peft_model.base_model.model, r)
    out = hidden(ours, batch)
    assert (out - base_out).abs().max() > 1e-2  # the LoRA path matters
    torch.testing.assert_close(out, peft_model(**batch, output_hidden_states=True).hidden_states[-1],
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("targets", TARGETS, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_merge_unmerge_remove(arch, targets):
    backbone = tiny_backbone(arch)
    batch = batch_for(backbone)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    modules_before = {n: m for n, m in backbone.model.named_modules()}
    ref = hidden(backbone, batch)
    injection = peftbench.apply(LORA, backbone, LORA.config(r=3, targets=targets))
    torch.testing.assert_close(hidden(backbone, batch), ref, atol=1e-5, rtol=0)  # B = 0 at init
    randomize(injection, std=0.1)
    unmerged = hidden(backbone, batch)
    assert (unmerged - ref).abs().max() > 1e-3
    weights = {n: w.base_layer.weight for n, w in wrappers(backbone).items()}
    keys = backbone.model.state_dict().keys()
    injection.merge()
    assert backbone.model.state_dict().keys() == keys  # merging swaps weights, adds no tensors
    assert all(w.merged and w.base_layer.weight is not weights[n] for n, w in wrappers(backbone).items())
    torch.testing.assert_close(hidden(backbone, batch), unmerged, atol=1e-5, rtol=0)
    injection.unmerge()
    assert all(w.base_layer.weight is weights[n] for n, w in wrappers(backbone).items())
    assert torch.equal(hidden(backbone, batch), unmerged)
    injection.merge()
    injection.remove()  # after a merge: unmerges, then unwraps
    after = backbone.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: m for n, m in backbone.model.named_modules()} == modules_before
    assert torch.equal(hidden(backbone, batch), ref)


# per layer and unit of rank, all-linear: sum of (d_in + d_out) over the linear sites
# d = 32, intermediate 48; bert-like: 4 * (32 + 32) + (32 + 48) + (48 + 32) = 416; gpt2: the same
# with q|k|v as slices; llama GQA: q 64, k 32+16, v 32+16, o 64, gate/up/down 80 each = 464
ALL_LINEAR_PER_RANK = {"bert": 416, "roberta": 416, "distilbert": 416, "gpt2": 416, "llama": 464}
ALL_LINEAR_MAX_RANK = {"bert": 32, "roberta": 32, "distilbert": 32, "gpt2": 32, "llama": 16}
ALL_LINEAR_MODULES = {"bert": 6, "roberta": 6, "distilbert": 6, "gpt2": 4, "llama": 7}  # wrappers per layer


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_counts(arch):
    backbone = tiny_backbone(arch)
    cfg = LORA.config(r=2, targets="all-linear")
    expected = 2 * 2 * ALL_LINEAR_PER_RANK[arch]  # L = 2, r = 2
    assert LORA.param_count(cfg, backbone.spec) == expected
    assert LORA.knob_range(cfg, backbone.spec) == (1, ALL_LINEAR_MAX_RANK[arch])
    injection = peftbench.apply(LORA, backbone, cfg)
    assert backbone.count_trainable() == expected
    assert len(wrappers(backbone)) == 2 * ALL_LINEAR_MODULES[arch]
    injection.remove()


def test_gpt2_slices_receive_deltas_only_in_their_slice():
    """q and v on the fused c_attn: one wrapper; the k columns stay exactly the base's."""
    backbone = tiny_backbone("gpt2")
    injection = peftbench.apply(LORA, backbone, LORA.config(r=2, targets=["q", "v"]))
    randomize(injection)
    c_attn = backbone.model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, SlicedLoRALinear) and c_attn.slices == [(0, 32), (64, 96)]
    assert c_attn.lora_A.weight.shape == (4, 32) and c_attn.lora_B.weight.shape == (64, 2)
    x = torch.randn(3, 5, 32)
    delta = c_attn(x) - c_attn.base_layer(x)
    assert (delta[..., 32:64] == 0).all()
    assert (delta[..., :32].abs() > 0).all() and (delta[..., 64:].abs() > 0).all()
    weight = c_attn.base_layer.weight.clone()  # Conv1D: (d_in, 3 * d)
    injection.merge()
    merged = c_attn.base_layer.weight
    assert torch.equal(merged[:, 32:64], weight[:, 32:64])
    assert not torch.equal(merged[:, :32], weight[:, :32]) and not torch.equal(merged[:, 64:], weight[:, 64:])
    injection.remove()


def test_llama_gqa_key_value_width():
    backbone = tiny_backbone("llama")  # 4 heads, 2 kv heads, head_dim 8: k/v are 32 -> 16
    injection = peftbench.apply(LORA, backbone, LORA.config(r=3, targets=["q", "k", "v"]))
    attn = backbone.model.model.layers[1].self_attn
    assert attn.q_proj.lora_B.weight.shape == (32, 3)
    assert attn.k_proj.lora_B.weight.shape == (16, 3) and attn.v_proj.lora_B.weight.shape == (16, 3)
    assert backbone.count_trainable() == 2 * 3 * (64 + 48 + 48)
    injection.remove()


@pytest.mark.parametrize("values, needle", [
    ({"targets": ["q", "x"]}, "targets"),
    ({"targets": []}, "targets"),
    ({"r": 0}, "'r'"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_names_the_field(values, needle):
    with pytest.raises(peftbench.ConfigError, match=needle) as err:
        LORA.config(values)
    assert "'lora'" in str(err.value)


def test_site_missing_or_rank_too_large():
    spec = tiny_backbone("bert").spec
    with pytest.raises(peftbench.ConfigError, match="ffn_gate"):
        LORA.param_count(LORA.config(targets=["q", "ffn_gate"]), spec)
    with pytest.raises(peftbench.ConfigError, match=r"allowed 1\.\.32"):
        LORA.check(LORA.config(r=33), spec)
    assert LORA.config(targets="q, v").targets == ["q", "v"]


def test_dropout_only_in_training():
    backbone = tiny_backbone("bert")
    injection = peftbench.apply(LORA, backbone, LORA.config(r=2, dropout=0.5))
    randomize(injection)
    batch = batch_for(backbone)
    assert torch.equal(hidden(backbone, batch), hidden(backbone, batch))  # eval: dropout off
    backbone.model.train()
    torch.manual_seed(0)
    assert not torch.equal(hidden(backbone, batch), hidden(backbone, batch))
    injection.remove()


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_backbone_forward_backward(name):
    backbone = peftbench.load_backbone(name, task="causal_lm" if name == "smollm2" else "classification",
                                       registry=peftbench.get_registry())
    backbone.freeze()
    cfg = LORA.config(r=4)
    injection = peftbench.apply(LORA, backbone, cfg)
    assert backbone.count_trainable() == LORA.param_count(cfg, backbone.spec)
    batch = backbone.tokenizer(["a short test sentence"], return_tensors="pt")
    labels = batch["input_ids"] if name == "smollm2" else torch.tensor([1])
    loss = backbone.model(**batch, labels=labels).loss
    loss.backward()
    grads = {k: p.grad for k, p in injection.named_parameters().items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for k, g in grads.items() if "lora_B" in k)  # B's grad is nonzero at B = 0
    injection.remove()


# -- the fused autograd function -------------------------------------------------------------
def _fused_case(conv1d, slices, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_in, r = 5, 3
    d_out = 6 if slices else 7
    n = len(slices) if slices else 1
    width = slices[0][1] - slices[0][0] if slices else d_out
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    weight = rand(d_in, d_out) if conv1d else rand(d_out, d_in)
    return (rand(2, 4, d_in).requires_grad_(), weight, rand(d_out) if bias else None,
            rand(n * r, d_in).requires_grad_(), rand(n * width, r).requires_grad_())


@pytest.mark.parametrize("slices", [None, [(0, 2), (4, 6)], [(0, 2), (2, 4), (4, 6)]], ids=str)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_fused_function_gradcheck(conv1d, slices):
    """Gradients of x, A and B (float64 finite differences), with and without bias and x's gradient."""
    from torch.autograd import gradcheck

    from peftbench.blocks.lora_linear import _FusedLoRA

    for bias in (True, False):
        x, w, b, a, bb = _fused_case(conv1d, slices, bias)
        assert gradcheck(lambda x, a, bb: _FusedLoRA.apply(x, w, b, a, bb, 1.7, slices, conv1d), (x, a, bb))
        frozen_x = x.detach()
        assert gradcheck(lambda a, bb: _FusedLoRA.apply(frozen_x, w, b, a, bb, 1.7, slices, conv1d), (a, bb))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fused_path_equals_module_path(arch):
    """Training step, float32: the fused node gives the module path's outputs and gradients; W, b get none."""
    backbone = tiny_backbone(arch)
    batch = batch_for(backbone)
    injection = peftbench.apply(LORA, backbone, LORA.config(r=2, alpha=6.0, targets="all-linear"))
    randomize(injection, std=0.1)
    layers = list(wrappers(backbone).values())

    def check(fused):
        nodes = {type(layer(torch.randn(3, layer.lora_A.in_features)).grad_fn).__name__ for layer in layers}
        assert (nodes == {"_FusedLoRABackward"}) if fused else ("_FusedLoRABackward" not in nodes)
        assert all(layer.base_layer.weight.grad is None for layer in layers)

    assert_same_step(fused_and_module_steps(backbone, injection, layers, lambda: hidden(backbone, batch), check))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_no_grad_path_equals_module_path(arch, monkeypatch):
    """Evaluation (no_grad, inference_mode, or nothing that wants a gradient): the autograd-free
    path runs and gives the module path's outputs; with a gradient wanted it is not used."""
    import peftbench.blocks.lora_linear as lora_module

    backbone = tiny_backbone(arch)
    batch = batch_for(backbone)
    injection = peftbench.apply(LORA, backbone, LORA.config(r=2, alpha=6.0, targets="all-linear"))
    randomize(injection, std=0.1)
    layers = list(wrappers(backbone).values())
    assert any(layer.slices for layer in layers) == (arch == "gpt2")  # GPT-2: fused q|k|v slices
    calls = []
    real = lora_module._lora_no_grad
    monkeypatch.setattr(lora_module, "_lora_no_grad", lambda *a: calls.append(1) or real(*a))
    backbone.model.eval()
    for layer in layers:
        layer.fused = False
    with torch.no_grad():
        reference = hidden(backbone, batch)
    assert not calls
    for layer in layers:
        layer.fused = True
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            torch.testing.assert_close(hidden(backbone, batch), reference, atol=1e-5, rtol=1e-5)
        assert len(calls) == len(layers)
        calls.clear()
    trained = [p for p in injection.named_parameters().values() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    torch.testing.assert_close(hidden(backbone, batch).detach(), reference, atol=1e-5, rtol=1e-5)  # grad mode, nothing trained
    assert len(calls) == len(layers)
    calls.clear()
    for p in trained:
        p.requires_grad_(True)
    hidden(backbone, batch)
    assert not calls  # a gradient is wanted: the autograd node


def test_fused_path_falls_back_where_it_cannot_apply():
    """Dropout while training, autocast, a trained base, a mismatched dtype: the module path."""
    base = torch.nn.Linear(8, 6).requires_grad_(False)
    x = torch.randn(2, 8)
    layer = LoRALinear(base, 2, 4.0, dropout=0.5)
    assert not layer.train()._can_fuse(x) and layer.eval()._can_fuse(x)  # dropout is the identity in eval
    layer = LoRALinear(base, 2, 4.0)
    assert layer._can_fuse(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._can_fuse(x)
        assert layer(x).dtype == torch.bfloat16
    assert not layer._can_fuse(x.double())
    base.weight.requires_grad_(True)
    assert not layer._can_fuse(x)
