"""Key/value prefixes: the core mechanism, prefix tuning and P-tuning v2.

Checked on every tiny architecture (BERT, RoBERTa, DistilBERT without layer_idx, GPT-2
with fused qkv, LLaMA with GQA): the prefix equals "extra tokens whose keys/values are the
prefix", padding is never attended, the MLP runs once per forward, finalize() keeps the
outputs and saves only the flat tensor, cached generation equals uncached generation, and
outputs match peft's PrefixTuning with the same weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, VOCAB, inject, padded, positions, tiny_backbone, tiny_batch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import peftbench
from peftbench.backbones.kv_prefix import attach_kv_prefix

KV_METHODS = ("prefix", "ptuning_v2")


def with_positions(arch: str, data: dict) -> dict:
    """Decoders are left-padded: give explicit positions. Encoders (right-padded; RoBERTa
    numbers positions from its pad id + 1) keep their own."""
    return {**data, "position_ids": positions(data["attention_mask"])} if arch in DECODERS else data


def hidden(backbone, data) -> torch.Tensor:
    return backbone.base_model(**data).last_hidden_state


# -- the core mechanism ------------------------------------------------------------------

CAPTURE = "peftbench_test_capture"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    _captured[id(module)] = (key, value)  # (B, kv_heads, k, D), after RoPE, before GQA repeat
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


def test_prefix_equals_extra_tokens(arch):
    """A prefix made of the keys/values that n real tokens produce at each layer gives the
    same outputs at the other tokens as putting those n tokens in front of the input.

    This re-computes the mechanism independently of peft (peft has no DistilBERT prefix).
    Rows are padded, so the widened mask is exercised too.
    """
    n = 3
    backbone = tiny_backbone(arch)
    data = padded(arch)
    batch, length = data["input_ids"].shape
    extra = torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(5))
    layers = {id(s.module): s.layer for s in backbone.sites("attention")}
    # full run: [extra; input], the input keeps positions 0..T-1 (absolute and rotary alike)
    pos = positions(data["attention_mask"])
    full = {
        "input_ids": torch.cat([extra, data["input_ids"]], 1),
        "attention_mask": torch.cat([torch.ones(batch, n, dtype=torch.long), data["attention_mask"]], 1),
        "position_ids": torch.cat([torch.arange(n).expand(batch, n), pos], 1),
    }
    backbone.model.set_attn_implementation(CAPTURE)
    with torch.no_grad():
        expected = hidden(backbone, full)[:, n:]
    backbone.model.set_attn_implementation("sdpa")
    prefixes = {layers[k]: (key[:, :, :n], value[:, :, :n]) for k, (key, value) in _captured.items() if k in layers}
    assert sorted(prefixes) == list(range(backbone.spec.layers))

    undo = attach_kv_prefix(backbone, lambda layer, b: prefixes[layer])
    with torch.no_grad():
        got = hidden(backbone, {**data, "position_ids": pos})
    undo()
    real = data["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert backbone.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", KV_METHODS)
def test_padding_is_not_attended(registry, arch, method):
    """Outputs at the real positions of a padded row equal those of the row alone."""
    backbone = tiny_backbone(arch)
    inject(registry, backbone, method, n=4)
    data = padded(arch)
    data["input_ids"][1][data["attention_mask"][1] == 0] = 7  # pads that would change outputs if attended
    real = data["attention_mask"][1].bool()
    alone = {"input_ids": data["input_ids"][1:2, real]}
    with torch.no_grad():
        padded_out = hidden(backbone, with_positions(arch, data))[1, real]
        alone_out = hidden(backbone, alone)[0]
    torch.testing.assert_close(padded_out, alone_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method", KV_METHODS)
def test_generation_with_cache_equals_without(registry, method, arch):
    backbone = tiny_backbone(arch, task="causal_lm")
    data = padded(arch)

    def greedy(**kwargs):
        with torch.no_grad():
            out = backbone.model.generate(**data, max_new_tokens=6, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, **kwargs)
        return out.sequences, torch.stack(out.logits, 1)  # (B, T + 6), (B, 6, V)

    plain, plain_logits = greedy()
    inject(registry, backbone, method, n=5)
    cached, cached_logits = greedy(use_cache=True)
    uncached, uncached_logits = greedy(use_cache=False)
    assert cached.shape == plain.shape == (3, 7 + 6)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached_logits[:, 0], plain_logits[:, 0], atol=1e-3)  # the prefix is really there


def test_two_prefixes_and_bad_shapes_are_errors():
    backbone = tiny_backbone("llama")
    undo = attach_kv_prefix(backbone, lambda layer, b: (torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)))
    with pytest.raises(peftbench.ConfigError, match="already carries"):
        attach_kv_prefix(backbone, lambda layer, b: None)
    with pytest.raises(peftbench.ConfigError, match="2 kv heads"):  # 4 = attention heads, not kv heads
        backbone.model(**tiny_batch())
    undo()


# -- prefix tuning and P-tuning v2 ----------------------------------------------------------

@pytest.mark.parametrize(
    "method,cfg",
    [("prefix", {}), ("prefix", {"hidden": 16}), ("prefix", {"reparameterize": False}), ("ptuning_v2", {})],
)
def test_counts_are_exact(registry, arch, method, cfg):
    for n in (1, 6):
        backbone = tiny_backbone(arch)
        m, injection = inject(registry, backbone, method, n=n, **cfg)
        spec = backbone.spec
        assert backbone.count_trainable() == m.param_count(injection.config, spec)
        assert m.stored_count(injection.config, spec) == spec.layers * 2 * n * spec.kv_dim
        injection.finalize()
        assert sum(t.numel() for t in injection.state_dict().values()) == m.stored_count(injection.config, spec)


def test_prefix_count_formula_on_gqa():
    # L=2, d=32, kv_dim = 2 kv heads * 8 = 16, n=3, b=16: n·d + d·b + b + b·2L·kv_dim + 2L·kv_dim
    spec = tiny_backbone("llama").spec
    m = peftbench.get_registry().method("prefix")
    assert m.param_count(m.config(n=3, hidden=16), spec) == 3 * 32 + 32 * 16 + 16 + 16 * 64 + 64
    assert m.stored_count(m.config(n=3, hidden=16), spec) == 2 * 2 * 3 * 16
    assert peftbench.get_registry().method("p-tuning-v2").param_count(m.config(n=3), spec) == 2 * 2 * 3 * 16


def test_prefix_table_layout_on_gqa():
    """The MLP's (n, L·2·kv_dim) output is read as (n, L, 2, kv_heads, head_dim)."""
    backbone = tiny_backbone("llama")
    _, injection = inject(peftbench.get_registry(), backbone, "prefix", n=3, hidden=16)
    table = injection.table
    flat = table.mlp(table.embedding).detach()  # (n, L·2·kv_dim)
    got = table().detach()
    spec = backbone.spec
    for layer in range(spec.layers):
        for kv in range(2):
            for head in range(spec.kv_heads):
                start = ((layer * 2 + kv) * spec.kv_heads + head) * spec.head_dim
                assert torch.equal(got[layer, kv, head], flat[:, start:start + spec.head_dim])


def test_mlp_runs_once_per_forward_and_trains(registry):
    backbone = tiny_backbone("gpt2", task="causal_lm")
    m, injection = inject(registry, backbone, "prefix", n=3, hidden=8)
    calls = []
    injection.table.mlp.register_forward_hook(lambda *a: calls.append(1))
    data = tiny_batch()
    optimizer = torch.optim.SGD(injection.table.parameters(), lr=0.1)
    for step in range(2):  # a fresh graph each forward: no stale table, no double backward
        loss = backbone.model(**data, labels=data["input_ids"]).loss
        loss.backward()
        assert injection.table.embedding.grad.abs().sum() > 0 and injection.table.mlp[0].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert len(calls) == 2  # 2 forwards x 2 layers, one MLP call each forward
    # the kept per-forward table is not a parameter: counts and saved state are unchanged
    assert backbone.count_trainable() == m.param_count(injection.config, backbone.spec)
    assert sorted(k.rsplit(".", 1)[-1] for k in injection.state_dict()) == ["bias", "bias", "embedding", "weight", "weight"]


def test_table_is_split_once_and_cached_without_gradients(registry):
    """One unbind per forward; without gradients the table is reused until a parameter changes."""
    backbone = tiny_backbone("bert")
    _, injection = inject(registry, backbone, "prefix", n=3, hidden=8)
    table = injection.table
    calls = []
    table.mlp.register_forward_hook(lambda *a: calls.append(1))
    data = padded("bert")
    with torch.no_grad():
        first = backbone.model(**data).logits
        assert torch.equal(backbone.model(**data).logits, first) and len(calls) == 1  # cached
        table.embedding.add_(0.5)  # in place (as an optimiser step): the cache is stale
        changed = backbone.model(**data).logits
    assert len(calls) == 2 and not torch.allclose(changed, first)
    backbone.model(**data).logits.sum().backward()  # with gradients: a fresh graph, never the cache
    backbone.model(**data).logits.sum().backward()
    assert len(calls) == 4 and table.embedding.grad.abs().sum() > 0
    parts = table._current
    assert len(parts) == 2 * backbone.spec.layers and parts[0].grad_fn is parts[-1].grad_fn  # one split node
    injection.finalize()  # the flattened table: cached likewise, invalidated by load_state_dict
    with torch.no_grad():
        flat = backbone.model(**data).logits
        torch.testing.assert_close(flat, changed, atol=1e-6, rtol=0)
        injection.load_state_dict({k: v + 1.0 for k, v in injection.state_dict().items()})
        assert not torch.allclose(backbone.model(**data).logits, flat)
    with torch.inference_mode():  # built in inference mode; a later no_grad forward rebuilds its own
        backbone.model(**data)
    with torch.no_grad():
        backbone.model(**data)
    backbone.model(**data).logits.sum().backward()
    assert table.prefix.grad.abs().sum() > 0


@pytest.mark.parametrize("method", KV_METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(registry, method):
    """Checkpointed layers re-run on the forward's prefix tensor, not on a recomputed one."""
    backbone = tiny_backbone("llama")
    _, injection = inject(registry, backbone, method, n=3, **({"hidden": 8} if method == "prefix" else {}))
    backbone.model.train()
    data, labels = tiny_batch(left=True), torch.tensor([0, 1, 0])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            backbone.model.gradient_checkpointing_enable()
        backbone.model(**data, labels=labels).loss.backward()
        grads.append({k: p.grad.clone() for k, p in injection.named_parameters().items()})
        backbone.model.zero_grad(set_to_none=True)
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "arch,task", [("bert", "classification"), ("distilbert", "classification"), ("llama", "causal_lm")]
)
def test_finalize_keeps_outputs_and_saves_only_the_table(registry, tmp_path, arch, task):
    backbone = tiny_backbone(arch, task=task)
    m, injection = inject(registry, backbone, "prefix", n=4, hidden=8)
    data = padded(arch)
    with torch.no_grad():
        before = backbone.model(**data).logits
    injection.finalize()
    with torch.no_grad():
        after = backbone.model(**data).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    state = injection.state_dict()
    assert [tuple(t.shape) for t in state.values()] == [(2, 2, backbone.spec.kv_heads, 4, backbone.spec.head_dim)]
    injection.save(tmp_path)
    fresh = tiny_backbone(arch, task=task, seed=0)
    fresh.freeze()
    loaded = peftbench.load_injection(fresh, tmp_path, registry)
    assert loaded.finalized and not loaded.table.reparameterized
    with torch.no_grad():
        assert torch.equal(fresh.model(**data).logits, after)


def test_bad_input_names_method_field_and_range(registry):
    backbone = tiny_backbone("bert")  # max_position_embeddings = 64
    for method in KV_METHODS:
        m = registry.method(method)
        with pytest.raises(peftbench.ConfigError, match=rf"method '{method}'.*'n' = 65.*allowed 1\.\.64"):
            peftbench.apply(m, backbone, m.config(n=65))  # refused by check, before inject
        with pytest.raises(peftbench.ConfigError, match="'n'"):
            m.config(n=0)
        with pytest.raises(peftbench.ConfigError, match="'rank'"):
            m.config(rank=4)
    assert registry.method("prefix-tuning").name == "prefix" and registry.method("ptuningv2").name == "ptuning_v2"


# -- parity with peft -----------------------------------------------------------------------

CASES = [("bert", "classification"), ("gpt2", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm"),
         ("llama", "classification")]
FLAT = [("prefix", {"reparameterize": False}), ("ptuning_v2", {})]
# peft's GQA prefix embeds its n tokens in kv_dim (not d) before the MLP, so a reparameterised
# LLaMA prefix cannot share weights with peft's; test_prefix_table_layout_on_gqa and
# test_prefix_equals_extra_tokens cover that case by direct re-computation.
PEFT_CASES = [(a, t, m, c) for a, t in CASES for m, c in FLAT] + [
    (a, t, "prefix", {"hidden": 16}) for a, t in CASES if a != "llama"
]


def bridge_cache_argument(model) -> str:
    """benchmarks/peft_compat.py's bridge (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peft_compat.py"
    spec = importlib.util.spec_from_file_location("peft_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bridge_cache_argument(model)


@pytest.mark.parametrize("arch,task,method,cfg", PEFT_CASES)
def test_matches_peft(registry, arch, task, method, cfg):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    n = 3
    reparam = method == "prefix" and cfg.get("reparameterize", True)
    data = padded(arch)
    pos = positions(data["attention_mask"])
    ours = tiny_backbone(arch, task=task)
    with torch.no_grad():
        plain = ours.model(**data, position_ids=pos).logits
    _, injection = inject(registry, ours, method, n=n, **cfg)
    theirs = tiny_backbone(arch, task=task)  # same seed: same weights
    peft_cfg = PrefixTuningConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        num_virtual_tokens=n, prefix_projection=reparam, encoder_hidden_size=16,
    )
    model = get_peft_model(theirs.model, peft_cfg).eval()  # peft returns it in training mode
    bridge_cache_argument(model)  # peft 0.21 with transformers >= 5.24 (see benchmarks/peft_compat.py)
    encoder = model.prompt_encoder["default"]
    table = injection.table
    with torch.no_grad():
        if reparam:
            encoder.embedding.weight.copy_(table.embedding)
            encoder.transform.load_state_dict(table.mlp.state_dict())
        else:  # peft: (n, [L, 2, kv_heads, head_dim]) flat; ours (L, 2, kv_heads, n, head_dim)
            encoder.embedding.weight.copy_(table.prefix.permute(3, 0, 1, 2, 4).reshape(n, -1))
    # peft hands the prefix to the model as n cached tokens, and peft 0.21 adds n to any
    # position_ids it is given ("to account for the KV cache prefix"): its real tokens sit at
    # positions n..n+T-1 (absolute embeddings and RoPE alike). Ours are not in the cache and
    # keep 0..T-1. Handing peft `pos - n` makes both run the real tokens at `pos`.
    with torch.no_grad():
        got = ours.model(**data, position_ids=pos).logits
        expected = model(**data, position_ids=pos - n).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-5, rtol=1e-5)  # the prefix is really there


# -- the packaged real backbones --------------------------------------------------------------

@pytest.fixture(scope="module", params=[("minilm", "classification"), ("smollm2", "causal_lm")], ids=lambda p: p[0])
def real_backbone(request):
    name, task = request.param
    backbone = peftbench.load_backbone(name, task=task, registry=peftbench.get_registry())
    backbone.tokenizer.padding_side = "left" if backbone.spec.is_decoder else "right"
    return backbone


@pytest.mark.parametrize("method", KV_METHODS)
def test_real_backbone_forward_backward(registry, real_backbone, method):
    backbone = real_backbone
    data = backbone.tokenizer(["a short test sentence", "hi there"], return_tensors="pt", padding=True)
    if backbone.task == "causal_lm":
        data["position_ids"] = positions(data["attention_mask"])
        labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([0, 1])
    m, injection = inject(registry, backbone, method, n=4)
    try:
        assert backbone.count_trainable() == m.param_count(injection.config, backbone.spec)
        loss = backbone.model(**data, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in injection.named_parameters().values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        trained = backbone.trainable_parameters(include_head=True)
        frozen = [p for n, p in backbone.model.named_parameters() if n not in trained]
        assert frozen and all(p.grad is None for p in frozen)
    finally:
        injection.remove()
        backbone.model.zero_grad(set_to_none=True)
