"""Model families beyond the first five, and the layout inferred for families nobody registered.

On tiny random configs (``families.py``) of qwen2, qwen3, mistral, gemma, gemma2, gemma3_text,
phi3 (fused q|k|v under GQA, fused gate|up), xlm-roberta, electra and deberta-v2:
- every site resolves with the shapes the config implies; fused slices are the model's own split;
- the v site's output is what the attention function receives as values (the layout points at the
  right modules, and the attention site is the module that calls the attention function);
- lora, houlsby and ptuning_v2 inject with counts equal to their closed forms, run a forward and a
  backward that reach every method parameter, and remove() restores the model bit for bit;
- the key/value prefix equals "extra tokens whose keys and values are the prefix" (SDPA and
  Gemma 2's eager soft-capped attention alike), and cached generation equals uncached;
- DeBERTa-v2's disentangled attention takes key/value prefixes through its layout's own
  ``prefix_attention`` (content scores for the prefix columns, its relative terms over the real tokens).
Inference: it reproduces every registered table that follows the usual names, runs the methods
on real unregistered families (Granite, OLMo, StableLM, StarCoder2, CamemBERT) after a one-line warning,
and fails in one line naming the model type and what it could not find (GPT-NeoX, T5).
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

import peftbench
from conftest import ARCHS, copy_lora_into_peft, VOCAB, positions, tiny_batch, tiny_config
from families import (DECODERS, ENCODERS, FAMILIES, INFERRED, INFERRED_DECODERS, family_config, save_folder,
                      task_of)
from peftbench.backbones.kv_prefix import attach_kv_prefix
from peftbench_plugins import layout_inference

REGISTRY = peftbench.get_registry()
METHODS = ("lora", "houlsby", "ptuning_v2")
KNOBS = {"lora": (1, 3), "houlsby": (1, 4), "ptuning_v2": (1, 3), "prompt": (1, 3), "ptuning": (1, 3)}
PREFIXED = tuple(f for f in FAMILIES if f != "deberta-v2")  # families whose attention goes through the registry


def build(family: str, **kwargs) -> peftbench.Backbone:
    return peftbench.from_config(family_config(family, **kwargs), task=task_of(family), registry=REGISTRY)


def batch_and_labels(backbone):
    data = tiny_batch(left=backbone.spec.is_decoder)
    if backbone.task == "causal_lm":
        return data, data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    return data, torch.tensor([0, 1, 1])


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sites_resolve_with_the_configs_shapes(family):
    backbone = build(family)
    spec, config = backbone.spec, backbone.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or 32 // heads
    assert (spec.model_type, spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) == \
        (family, 2, 32, heads, kv_heads, head_dim)
    assert spec.is_decoder == (family in DECODERS)
    shapes = {"q": (32, heads * head_dim), "k": (32, kv_heads * head_dim), "v": (32, kv_heads * head_dim),
              "attn_out": (heads * head_dim, 32), "ffn_in": (32, 48), "ffn_out": (48, 32)}
    if family in DECODERS:
        shapes["ffn_gate"] = (32, 48)
    assert spec.site_shapes == shapes
    for name in backbone.layout.site_names():
        sites = backbone.sites(name)
        assert len({(id(s.module), s.out_slice) for s in sites}) == 2  # one per layer
        if name in shapes:
            assert (sites[1].in_features, sites[1].out_features) == shapes[name]
    total = sum(p.numel() for p in {id(p): p for p in backbone.model.parameters()}.values())
    assert spec.base_params + spec.head_params == total
    assert (spec.head_params > 0) == (family in ENCODERS)


def test_phi3_fused_slices_are_the_models_own_split():
    backbone = build("phi3")
    q, k, v, gate, up = (backbone.site(0, n) for n in ("q", "k", "v", "ffn_gate", "ffn_in"))
    assert q.module is k.module is v.module and gate.module is up.module
    assert (q.out_slice, k.out_slice, v.out_slice) == ((0, 32), (32, 48), (48, 64))  # 4 heads | 2 kv | 2 kv, of 8
    assert (gate.out_slice, up.out_slice) == ((0, 48), (48, 96))
    mlp = backbone.model.model.layers[0].mlp
    x = torch.randn(1, 3, 32)
    h = mlp.gate_up_proj(x)
    expected = mlp.down_proj(h[..., slice(*up.out_slice)] * mlp.activation_fn(h[..., slice(*gate.out_slice)]))
    torch.testing.assert_close(mlp(x), expected)


def test_unequal_slices_that_do_not_add_up_are_an_error():
    from peftbench.backbones.layout import slice_bounds

    layout = REGISTRY.architectures["phi3"].obj
    assert slice_bounds(layout, "self_attn.qkv_proj", ("q", "k", "v"), 64, {"q": 32, "k": 16, "v": 16}) == \
        [(0, 32), (32, 48), (48, 64)]
    assert slice_bounds(layout, "mlp.gate_up_proj", ("ffn_gate", "ffn_in"), 96, None) == [(0, 48), (48, 96)]
    with pytest.raises(peftbench.LayoutError, match=r"'self_attn.qkv_proj' of 'phi3' has 60 outputs.*q=32 \+ k=16"):
        slice_bounds(layout, "self_attn.qkv_proj", ("q", "k", "v"), 60, {"q": 32, "k": 16, "v": 16})


CAPTURE = "peftbench_test_families_capture"
_seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Record the keys and values each attention module receives, then attend as the model does."""
    _seen[id(module)] = (key, value)  # (B, kv_heads, T, D)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    attend = eager if attention_mask is not None and attention_mask.is_floating_point() else sdpa_attention_forward
    return attend(module, query, key, value, attention_mask, **kwargs)


def _capture_mask(*args, **kwargs):
    """Eager masks (additive floats) for the families that run eager attention, SDPA's otherwise."""
    return (eager_mask if _capture_mask.eager else sdpa_mask)(*args, **kwargs)


AttentionInterface.register(CAPTURE, _capture)
AttentionMaskInterface.register(CAPTURE, _capture_mask)


def capture(backbone, data) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values per layer for ``data`` (through the capture function), outputs unchanged."""
    model, before = backbone.model, backbone.model.config._attn_implementation
    _capture_mask.eager = before == "eager"
    layers = {id(s.module): s.layer for s in backbone.sites("attention")}
    _seen.clear()
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            out = backbone.base_model(**data).last_hidden_state
    finally:
        model.set_attn_implementation(before)
    return out, {layers[k]: kv for k, kv in _seen.items() if k in layers}


@pytest.mark.parametrize("family", PREFIXED)
def test_v_site_output_is_the_attention_values(family):
    backbone = build(family)
    data = tiny_batch(left=backbone.spec.is_decoder)
    site = backbone.site(1, "v")
    got = {}
    handle = site.module.register_forward_hook(lambda m, args, out: got.setdefault("v", out))
    try:
        _, seen = capture(backbone, data)
    finally:
        handle.remove()
    out = got["v"] if site.out_slice is None else got["v"][..., slice(*site.out_slice)]
    b, t = data["input_ids"].shape
    values = out.view(b, t, backbone.spec.kv_heads, backbone.spec.head_dim).transpose(1, 2)
    torch.testing.assert_close(seen[1][1], values)


# -- methods -------------------------------------------------------------------------------

def check_method(backbone, name: str) -> None:
    """Counts equal the closed form at two knob values; a forward and backward reach every method
    parameter and no frozen one; remove() restores weights, outputs, hooks and the attention function."""
    method = REGISTRY.method(name)
    data, labels = batch_and_labels(backbone)
    model = backbone.model
    state, n_hooks, attention = snapshot(model), hooks(model), model.config._attn_implementation
    with torch.no_grad():
        before = model(**data).logits
    for value in KNOBS[name]:
        cfg = method.with_knob(method.config(), value)
        injection = peftbench.apply(method, backbone, cfg)  # raises unless measured == param_count
        assert injection.trainable_params == backbone.count_trainable() == method.param_count(cfg, backbone.spec) > 0
        g = torch.Generator().manual_seed(value)
        with torch.no_grad():  # away from the identity init, so remove() has something to undo
            for p in injection.added_parameters().values():  # (trained base weights are the method's to change)
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.zero_grad(set_to_none=True)
        loss = model(**data, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        params = injection.named_parameters()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values()), name
        assert sum(p.grad.abs().sum() for p in params.values()) > 0
        trained = {id(p) for p in [*params.values(), *backbone.head_parameters().values()]}
        assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
        with torch.no_grad():
            changed = model(**data).logits
        assert not torch.allclose(changed, before)  # the method is really in the forward
        injection.remove()
        model.zero_grad(set_to_none=True)
        after = snapshot(model)
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
        assert hooks(model) == n_hooks and model.config._attn_implementation == attention
        with torch.no_grad():
            assert torch.equal(model(**data).logits, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_methods_count_train_and_remove(family, method):
    backbone = build(family)
    check_method(backbone, method)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_prompts_take_the_embeddings_width(method):
    """ELECTRA's embeddings (16 wide here, 128 in ELECTRA-small) are projected up to its blocks (32):
    a soft prompt lives in the embeddings' width, and its closed form counts that width."""
    backbone = build("electra")
    assert (backbone.spec.embed_dim, backbone.spec.hidden) == (16, 32)
    check_method(backbone, method)


def test_phi3_lora_on_unequal_slices_equals_peft_and_merges():
    """LoRA on q, k, v of Phi-3's fused qkv_proj (32 | 16 | 16) and on gate|up equals peft's LoRA
    with the block-structured B on the whole projection, and merging changes nothing."""
    from peft import LoraConfig, get_peft_model

    lora = REGISTRY.method("lora")
    ours, theirs = build("phi3"), build("phi3")
    ours.model.double(), theirs.model.double()
    data, _ = batch_and_labels(ours)
    r, alpha = 2, 6.0
    injection = peftbench.apply(lora, ours, lora.config(r=r, alpha=alpha, targets="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in injection.named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    wrappers = {n: m for n, m in ours.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "slices")}
    sliced = {n: len(w.slices) for n, w in wrappers.items() if w.slices}
    assert sorted(n.split(".")[-1] for n in sliced) == ["gate_up_proj", "gate_up_proj", "qkv_proj", "qkv_proj"]
    peft_model = get_peft_model(theirs.model, LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(wrappers), lora_dropout=0.0,
        rank_pattern={n: r * k for n, k in sliced.items()}, alpha_pattern={n: alpha * k for n, k in sliced.items()}))
    copy_lora_into_peft(wrappers, peft_model.base_model.model, r)
    with torch.no_grad():
        out = ours.model(**data).logits
        torch.testing.assert_close(out, peft_model(**data).logits, atol=1e-10, rtol=0)
        injection.merge()
        torch.testing.assert_close(ours.model(**data).logits, out, atol=1e-10, rtol=0)
        injection.unmerge()
    ours.model.train()  # the fused autograd node and the module path give the same step
    for fused in (True, False):
        for w in wrappers.values():
            w.fused = fused
        ours.model.zero_grad(set_to_none=True)
        ours.model(**data).logits.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in injection.named_parameters().items()}
        if fused:
            first = grads
    for k in grads:
        torch.testing.assert_close(first[k], grads[k], atol=1e-10, rtol=1e-8)


def test_fused_lora_function_gradcheck_on_unequal_slices():
    from torch.autograd import gradcheck

    from peftbench.blocks.lora_linear import _FusedLoRA

    g = torch.Generator().manual_seed(0)
    slices, r = [(0, 4), (4, 6), (6, 8)], 2  # q | k | v of a GQA projection

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, w, b = rand(2, 3, 5).requires_grad_(), rand(8, 5), rand(8)
    a, bb = rand(3 * r, 5).requires_grad_(), rand(8, r).requires_grad_()
    assert gradcheck(lambda x, a, bb: _FusedLoRA.apply(x, w, b, a, bb, 1.5, slices, False), (x, a, bb))


# -- the key/value prefix ------------------------------------------------------------------

@pytest.mark.parametrize("family", PREFIXED)
def test_kv_prefix_equals_prepended_tokens(family):
    """The prefix of layer i is the keys/values n extra tokens produce there; with it, the outputs at
    the real positions equal those of the run over [extra; input] (the window is widened so that no
    extra token falls out of a sliding window: prefix columns are always attended)."""
    n = 3
    backbone = build(family, window=64)
    data = tiny_batch(left=backbone.spec.is_decoder)
    batch, _ = data["input_ids"].shape
    extra = torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(5))
    pos = positions(data["attention_mask"])
    full = {"input_ids": torch.cat([extra, data["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones(batch, n, dtype=torch.long), data["attention_mask"]], 1),
            "position_ids": torch.cat([torch.arange(n).expand(batch, n), pos], 1)}
    expected, seen = capture(backbone, full)
    prefixes = {layer: (key[:, :, :n], value[:, :, :n]) for layer, (key, value) in seen.items()}
    assert sorted(prefixes) == [0, 1]
    before = backbone.model.config._attn_implementation
    undo = attach_kv_prefix(backbone, lambda layer, b: prefixes[layer])
    try:
        with torch.no_grad():
            got = backbone.base_model(**data, position_ids=pos).last_hidden_state
    finally:
        undo()
    real = data["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[:, n:][real], atol=1e-5, rtol=1e-5)
    assert backbone.model.config._attn_implementation == before


def test_deberta_prefix_of_no_tokens_is_the_plain_attention():
    """DeBERTa-v2's prefix path recomputes its disentangled attention (c2p and p2c relative terms): with a
    prefix of zero tokens it gives the model's own outputs; switched off, the module's own forward runs."""
    backbone = build("deberta-v2")
    data = tiny_batch()
    spec = backbone.spec
    with torch.no_grad():
        plain = backbone.model(**data).logits
    empty = torch.zeros(spec.kv_heads, 0, spec.head_dim)
    undo = attach_kv_prefix(backbone, lambda layer, b: (empty, empty))
    try:
        with torch.no_grad():
            torch.testing.assert_close(backbone.model(**data).logits, plain, atol=1e-6, rtol=1e-6)
    finally:
        undo()
    assert not any("forward" in m.__dict__ or "_peftbench_kv_prefix" in m.__dict__ for m in backbone.model.modules())


def test_deberta_prefix_equals_prepended_tokens_without_relative_attention():
    """With DeBERTa's relative terms off (absolute positions, content attention only), a prefix of the keys
    and values n extra tokens produce equals running over [extra; input]: the prefix columns' scores, the
    mask and the values are put in as the module's own computation would."""
    n = 3
    config = family_config("deberta-v2")
    config.relative_attention, config.position_biased_input, config.pos_att_type = False, True, []
    backbone = peftbench.from_config(config, task="classification", registry=REGISTRY)
    backbone.model.eval()
    data = tiny_batch()
    batch, length = data["input_ids"].shape
    extra = torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(5))
    seen = {}
    handles = [s.module.key_proj.register_forward_hook(lambda m, a, out, i=s.layer: seen.setdefault(("k", i), out))
               for s in backbone.sites("attention")]
    handles += [s.module.value_proj.register_forward_hook(lambda m, a, out, i=s.layer: seen.setdefault(("v", i), out))
                for s in backbone.sites("attention")]
    full = {"input_ids": torch.cat([extra, data["input_ids"]], 1),
            "attention_mask": torch.cat([torch.ones(batch, n, dtype=torch.long), data["attention_mask"]], 1),
            "position_ids": torch.cat([torch.arange(n).expand(batch, n), torch.arange(n, n + length).expand(batch, -1)], 1)}
    with torch.no_grad():
        expected = backbone.base_model(**full).last_hidden_state
    for h in handles:
        h.remove()
    heads, dim = backbone.spec.kv_heads, backbone.spec.head_dim
    prefixes = {i: tuple(seen[(kind, i)][:, :n].view(batch, n, heads, dim).transpose(1, 2) for kind in "kv")
                for i in range(backbone.spec.layers)}
    undo = attach_kv_prefix(backbone, lambda layer, b: prefixes[layer])
    try:
        with torch.no_grad():
            got = backbone.base_model(**data, position_ids=torch.arange(n, n + length).expand(batch, -1)).last_hidden_state
    finally:
        undo()
    real = data["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[:, n:][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # SDPA and eager attention
def test_prefix_on_some_layers_leaves_the_others_as_they_were(family):
    backbone = build(family)
    data = tiny_batch(left=True)
    spec = backbone.spec
    prefix = torch.randn(spec.kv_heads, 4, spec.head_dim, generator=torch.Generator().manual_seed(0))

    def states():
        with torch.no_grad():
            return backbone.base_model(**data, output_hidden_states=True).hidden_states

    plain = states()
    undo = attach_kv_prefix(backbone, lambda layer, b: (prefix, prefix), layers=[1])
    try:
        prefixed = states()
    finally:
        undo()
    torch.testing.assert_close(prefixed[1], plain[1], atol=1e-6, rtol=1e-6)  # layer 0 ran as before
    real = data["attention_mask"].bool()
    assert not torch.allclose(prefixed[-1][real], plain[-1][real], atol=1e-3)  # layer 1 took the prefix
    torch.testing.assert_close(states()[-1], plain[-1], atol=0, rtol=0)  # undone


@pytest.mark.parametrize("family", DECODERS)
def test_prefix_generation_with_cache_equals_without(family):
    """Greedy decoding with P-tuning v2 attached: the KV cache (sliding-window layers included)
    never holds the prefix, so cached and uncached runs agree."""
    backbone = build(family)
    data = tiny_batch(left=True)

    def greedy(**kwargs):
        with torch.no_grad():
            out = backbone.model.generate(**data, max_new_tokens=6, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, **kwargs)
        return out.sequences, torch.stack(out.logits, 1)

    plain, plain_logits = greedy()
    ptuning = REGISTRY.method("ptuning_v2")
    injection = peftbench.apply(ptuning, backbone, ptuning.config(n=5))
    with torch.no_grad():
        for p in injection.named_parameters().values():
            p.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    cached, cached_logits = greedy(use_cache=True)
    uncached, uncached_logits = greedy(use_cache=False)
    assert cached.shape == plain.shape == (3, 7 + 6) and torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached_logits[:, 0], plain_logits[:, 0], atol=1e-3)


def test_prefix_refused_where_transformers_keeps_the_attention_function():
    """A layout that offers DeBERTa's attention as a prefix site without its ``prefix_attention``:
    transformers will not switch its attention function, so the prefix would be ignored; attaching
    is refused instead."""
    layout = REGISTRY.architectures["deberta-v2"].obj
    wrong = peftbench.ArchLayout(model_type="deberta-v2", layers=layout.layers, sites=layout.sites,
                                 embeddings=layout.embeddings)
    backbone = peftbench.Backbone(build("deberta-v2").model, wrong)
    with pytest.raises(peftbench.ConfigError, match="does not call transformers' attention-function registry"):
        attach_kv_prefix(backbone, lambda layer, b: (torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)))
    assert backbone.model.config._attn_implementation == "eager"
    assert not any("_peftbench_kv_prefix" in m.__dict__ for m in backbone.model.modules())


# -- inferred layouts ----------------------------------------------------------------------

@pytest.mark.parametrize("family", [*ARCHS, *(f for f in FAMILIES if f != "deberta-v2")])
def test_inference_reproduces_the_registered_tables(family):
    config = family_config(family) if family in FAMILIES else tiny_config(family)
    inferred, table = layout_inference.infer_layout(config), REGISTRY.architectures[family].obj
    for field in ("layers", "sites", "fused", "embeddings", "pre_norm", "causal"):
        assert getattr(inferred, field) == getattr(table, field), (family, field)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", INFERRED)
def test_unregistered_families_run_on_an_inferred_layout(family, method, monkeypatch, capsys):
    monkeypatch.setattr(layout_inference, "_WARNED", set())
    assert family not in REGISTRY.architectures
    backbone = build(family)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftbench: warning: ")
    assert f"model_type {family!r}" in lines[0] and "inferred from its module names" in lines[0]
    assert backbone.spec.is_decoder == (family in INFERRED_DECODERS)
    assert {"q", "k", "v", "attn_out", "ffn_in", "ffn_out", "attention"} <= set(backbone.layout.site_names())
    check_method(backbone, method)
    build(family)
    assert capsys.readouterr().err == ""  # once per model type


@pytest.mark.parametrize("family, needle", [
    ("gpt_neox", r"'gpt_neox': the blocks at 'layers' \(children: .*attention.*\) have no module for q, k, v, "
                 r"attn_out under the usual names \(q: self_attn.q_proj"),
    ("t5", "'t5': it is an encoder-decoder model"),
])
def test_not_inferable_is_a_one_line_error(family, needle):
    config = (transformers.T5Config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4) if family == "t5"
              else family_config(family))
    with pytest.raises(peftbench.LayoutError, match=f"^cannot infer a layout for model_type {needle}") as info:
        REGISTRY.layout_for(config)
    assert "\n" not in str(info.value) and str(info.value).endswith("register a peftbench.ArchLayout for it")


def test_a_plugins_resolver_is_asked_before_the_inference():
    table = REGISTRY.architectures["llama"].obj

    class Resolver:
        @peftbench.hookimpl
        def resolve_layout(self, config):
            return table if config.model_type == "olmo" else None

    assert peftbench.get_registry(extra=[Resolver()]).layout_for(family_config("olmo")) is table


# -- solve on a saved folder ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["phi3", "gemma2", "electra", "qwen2"])  # qwen2: its word-level test
# tokenizer knows none of the short batch's words, so verify runs on plain ids
def test_solve_loads_a_saved_folder_and_verifies(family, tmp_path, capsys):
    from peftbench.cli import main

    save_folder(family, tmp_path / family, width=64, vocab=4096)  # 1% reaches houlsby at m >= 1
    task = task_of(family)
    code = main(["solve", "--backbone", str(tmp_path / family), "--methods", ",".join(METHODS), "--budget", "1%",
                 "--task", task, "--json"])
    rows = {row["method"]: row for row in __import__("json").loads(capsys.readouterr().out)}
    assert code == 0 and set(rows) == set(METHODS)
    for name, row in rows.items():
        assert row["reachable"] and row["verified"] is True and row["measured"] == row["params"], (name, row)


def test_solve_shows_a_refusing_method_as_a_row_and_goes_on(tmp_path, capsys):
    """peft has no LoHa layer for GPT-2's Conv1D projections: peft:loha is refused there, and solve says so
    in its row (with the reason) instead of stopping before the other methods."""
    from peftbench.cli import main
    from run_helpers import make_tiny_model

    make_tiny_model(tmp_path / "gpt2", "gpt2")
    code = main(["solve", "--backbone", str(tmp_path / "gpt2"), "--methods", "lora,peft:loha,houlsby",
                 "--budget", "1%", "--task", "classification"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"\| peft:loha .*\| refused +\|", out) and re.search(r"\| lora .*\| yes +\|", out)
    assert re.search(r"\| houlsby .*\| yes +\|", out)
    assert "peft:loha: refused on this backbone:" in out and "Conv1D" in out
