"""Input prompts: prompt tuning and P-tuning (MLP and LSTM encoders).

On every tiny architecture: counts are exact, outputs match peft's PromptTuning and
PromptEncoder (P-tuning) with the same weights, padding is not attended, cached generation
equals uncached generation, causal-LM labels skip the prompt, every input keyword is
extended, and bad input is refused with errors that name the method, field and range.
Decoders are padded on the LEFT (their classification heads read the last position when
given inputs_embeds).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, inject, padded, positions, tiny_backbone, tiny_batch

import peftbench

PROMPT_METHODS = [
    ("prompt", {}), ("prompt", {"init": "random"}), ("ptuning", {}), ("ptuning", {"encoder": "lstm", "hidden": 16}),
]
CASES = [("bert", "classification"), ("roberta", "classification"), ("distilbert", "classification"),
         ("gpt2", "classification"), ("gpt2", "causal_lm"), ("llama", "classification"), ("llama", "causal_lm")]


def owned(injection) -> torch.nn.Module:
    """The method's module (SoftPrompt or PromptEncoder)."""
    (module,) = injection._owned.values()
    return module


@pytest.mark.parametrize("method,cfg", PROMPT_METHODS + [("ptuning", {"encoder": "lstm"}), ("ptuning", {"hidden": 7})])
def test_counts_are_exact(registry, arch, method, cfg):
    for n in (1, 5):
        backbone = tiny_backbone(arch)
        m, injection = inject(registry, backbone, method, n=n, **cfg)
        assert backbone.count_trainable() == m.param_count(injection.config, backbone.spec)
        assert sum(p.numel() for p in injection.named_parameters().values()) == backbone.count_trainable()


def test_count_formulas():
    spec = tiny_backbone("bert").spec  # d = 32
    reg = peftbench.get_registry()
    d, h, n = 32, 16, 5
    assert reg.method("prompt-tuning").param_count(reg.method("prompt").config(n=n), spec) == n * d
    ptuning = reg.method("p-tuning")
    assert ptuning.param_count(ptuning.config(n=n, hidden=h), spec) == n * d + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = (4 * h * (d + h) + 8 * h) * 2 + (4 * h * (2 * h + h) + 8 * h) * 2  # 2 layers x 2 directions
    head = (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    assert ptuning.param_count(ptuning.config(n=n, hidden=h, encoder="lstm"), spec) == n * d + lstm + head


@pytest.mark.parametrize("arch,task", CASES)
@pytest.mark.parametrize(
    "method,cfg", [("prompt", {}), ("ptuning", {"hidden": 16}), ("ptuning", {"encoder": "lstm", "hidden": 16})]
)
def test_matches_peft(registry, arch, task, method, cfg):
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    n = 3
    data = padded(arch)
    ours = tiny_backbone(arch, task=task)
    with torch.no_grad():
        plain = ours.model(**data).logits
    _, injection = inject(registry, ours, method, n=n, **cfg)
    theirs = tiny_backbone(arch, task=task)  # same seed: same weights
    common = dict(task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM, num_virtual_tokens=n)
    if arch == "distilbert":  # peft cannot read DistilBERT's config names
        common.update(token_dim=32, num_attention_heads=4, num_layers=2)
    if method == "prompt":
        peft_cfg = PromptTuningConfig(**common)
    else:
        peft_cfg = PromptEncoderConfig(**common, encoder_hidden_size=16,
                                       encoder_reparameterization_type=cfg.get("encoder", "mlp").upper())
    model = get_peft_model(theirs.model, peft_cfg).eval()  # peft returns it in training mode
    encoder, module = model.prompt_encoder["default"], owned(injection)
    with torch.no_grad():
        if method == "prompt":
            encoder.embedding.weight.copy_(module.prompt)
        else:
            encoder.embedding.weight.copy_(module.embedding)
            encoder.mlp_head.load_state_dict(module.mlp.state_dict())
            if "lstm" in module._modules:
                encoder.lstm_head.load_state_dict(module.lstm.state_dict())
        got = ours.model(**data).logits
        expected = model(**data).logits
    if task == "causal_lm":  # peft returns the prompt positions too; ours are cut to the caller's tokens
        expected = expected[:, n:]
    # both prepend the prompt to the embeddings and let the model number n + T positions
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-5, rtol=1e-5)  # the prompt is really there


@pytest.mark.parametrize("method,cfg", PROMPT_METHODS)
def test_padding_is_not_attended(registry, arch, method, cfg):
    """Outputs at the real positions of a padded row equal those of the row alone."""
    n = 4
    backbone = tiny_backbone(arch)
    inject(registry, backbone, method, n=n, **cfg)
    data = padded(arch)
    data["input_ids"][1][data["attention_mask"][1] == 0] = 7  # pads that would change outputs if attended
    real = data["attention_mask"][1].bool()
    alone = {"input_ids": data["input_ids"][1:2, real]}
    if arch in DECODERS:  # left padding: positions that skip the pads, as generate does
        data["position_ids"] = positions(data["attention_mask"])
    with torch.no_grad():
        batched = backbone.model(**data, output_hidden_states=True)
        single = backbone.model(**alone, output_hidden_states=True)
    last_batched, last_single = batched.hidden_states[-1], single.hidden_states[-1]  # (B, n + T, d)
    torch.testing.assert_close(last_batched[1, n:][real], last_single[0, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.logits[1], single.logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method,cfg", PROMPT_METHODS)
def test_generation_with_cache_equals_without(registry, arch, method, cfg):
    backbone = tiny_backbone(arch, task="causal_lm")
    data = padded(arch)

    def greedy(**kwargs):
        with torch.no_grad():
            out = backbone.model.generate(**data, max_new_tokens=6, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, **kwargs)
        return out.sequences, torch.stack(out.logits, 1)  # (B, T + 6), (B, 6, V)

    plain, plain_logits = greedy()
    inject(registry, backbone, method, n=4, **cfg)
    cached, cached_logits = greedy(use_cache=True)
    uncached, uncached_logits = greedy(use_cache=False)
    assert cached.shape == plain.shape == (3, 7 + 6)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached_logits[:, 0], plain_logits[:, 0], atol=1e-3)  # the prompt is really there


@pytest.mark.parametrize("arch", DECODERS)
def test_causal_lm_loss_skips_the_prompt(registry, arch):
    n = 4
    backbone = tiny_backbone(arch, task="causal_lm")
    inject(registry, backbone, "prompt", n=n)
    data = padded(arch)
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    seen = []
    backbone.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out))
    out = backbone.model(**data, labels=labels)
    full = seen[0]  # (B, n + T, V): the prompt's positions included
    assert out.logits.shape[:2] == labels.shape  # cut back to the caller's T positions
    assert torch.equal(out.logits, full[:, n:])
    # every real token is predicted, the first one from the prompt's last position; no loss
    # term has a prompt position as its target
    expected = torch.nn.functional.cross_entropy(full[:, n - 1:-1].reshape(-1, full.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_every_input_keyword_is_extended(registry):
    """token_type_ids, position_ids and positional input_ids reach the model extended by n."""
    n = 3
    backbone = tiny_backbone("bert")
    _, injection = inject(registry, backbone, "prompt", n=n)
    data = tiny_batch()
    types = torch.zeros_like(data["input_ids"])
    types[:, 4:] = 1
    pos = torch.arange(7).expand(3, -1)
    prompt = owned(injection)().detach()
    embeds = torch.cat([prompt.expand(3, -1, -1), backbone.embeddings()(data["input_ids"])], 1)
    ones = torch.ones(3, n, dtype=torch.long)
    with torch.no_grad():
        got = backbone.model(data["input_ids"], data["attention_mask"], types, pos).logits  # positional
        injection.remove()
        expected = backbone.model(
            inputs_embeds=embeds, attention_mask=torch.cat([ones, data["attention_mask"]], 1),
            token_type_ids=torch.cat([0 * ones, types], 1),
            position_ids=torch.cat([torch.arange(n).expand(3, n), pos + n], 1),
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_prompt_init(registry):
    backbone = tiny_backbone("gpt2")
    vocab = backbone.embeddings().weight
    _, injection = inject(registry, backbone, "prompt", n=6)
    prompt = owned(injection).prompt.detach()
    assert all(any(torch.equal(row, v) for v in vocab) for row in prompt)  # rows of the vocabulary
    injection.remove()
    _, injection = inject(registry, backbone, "prompt", n=30, init="random")
    prompt = owned(injection).prompt.detach()
    assert not any(torch.equal(prompt[0], v) for v in vocab)
    assert 0.7 < prompt.std().item() / vocab.std().item() < 1.3  # the vocabulary's scale


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_save_and_load(registry, tmp_path, method):
    backbone = tiny_backbone("llama", task="causal_lm")
    _, injection = inject(registry, backbone, method, n=3, **({"encoder": "lstm"} if method == "ptuning" else {}))
    data = padded("llama")
    with torch.no_grad():
        expected = backbone.model(**data).logits
    injection.save(tmp_path)
    fresh = tiny_backbone("llama", task="causal_lm", seed=0)
    fresh.freeze()
    peftbench.load_injection(fresh, tmp_path, registry)
    with torch.no_grad():
        assert torch.equal(fresh.model(**data).logits, expected)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_finalize_stores_only_the_prompt(registry, tmp_path, encoder):
    """finalize() keeps the encoder's output P (n, d) only: outputs unchanged, n·d values saved
    (= stored_count), the file a fraction of the encoder's, and loading reproduces the outputs."""
    backbone = tiny_backbone("llama", task="causal_lm")
    m, injection = inject(registry, backbone, "ptuning", n=3, encoder=encoder)
    data = padded("llama")
    with torch.no_grad():
        before = backbone.model(**data).logits
    injection.save(tmp_path / "encoder")
    injection.finalize()
    with torch.no_grad():
        after = backbone.model(**data).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    state = injection.state_dict()
    assert [tuple(t.shape) for t in state.values()] == [(3, backbone.spec.hidden)]
    assert sum(t.numel() for t in state.values()) == m.stored_count(injection.config, backbone.spec) == 3 * 32
    assert backbone.count_trainable() == 3 * 32  # P is what trains on, if training continues
    injection.save(tmp_path / "final", include_head=False)
    small = (tmp_path / "final" / "adapter_model.safetensors").stat().st_size
    assert small < 3 * 32 * 4 + 1024 < (tmp_path / "encoder" / "adapter_model.safetensors").stat().st_size
    fresh = tiny_backbone("llama", task="causal_lm", seed=0)
    fresh.freeze()
    loaded = peftbench.load_injection(fresh, tmp_path / "final", registry)
    assert loaded.finalized and loaded.encoder.flattened
    with torch.no_grad():
        assert torch.equal(fresh.model(**data).logits, after)


def test_bad_input_names_method_field_and_range(registry):
    backbone = tiny_backbone("bert")  # max_position_embeddings = 64: prompts of 1..32
    for method in ("prompt", "ptuning"):
        m = registry.method(method)
        with pytest.raises(peftbench.ConfigError, match=rf"method '{method}'.*'n' = 33.*allowed 1\.\.32"):
            peftbench.apply(m, backbone, m.config(n=33))  # refused by check, before inject
        with pytest.raises(peftbench.ConfigError, match="'n'"):
            m.config(n=0)
    with pytest.raises(peftbench.ConfigError, match="'encoder'"):
        registry.method("ptuning").config(encoder="gru")
    with pytest.raises(peftbench.ConfigError, match="'init'"):
        registry.method("prompt").config(init="zeros")
    _, injection = inject(registry, backbone, "prompt", n=30)
    too_long = torch.randint(3, 60, (1, 40))
    with pytest.raises(peftbench.ConfigError, match=r"method 'prompt': field 'n' = 30 .* n <= 24"):
        backbone.model(input_ids=too_long)
    with pytest.raises(peftbench.ConfigError, match="2-D attention_mask"):
        backbone.model(input_ids=too_long[:, :5], attention_mask=torch.ones(1, 1, 5, 5))


# -- the packaged real backbones --------------------------------------------------------------

@pytest.fixture(scope="module", params=[("minilm", "classification"), ("smollm2", "causal_lm")], ids=lambda p: p[0])
def real_backbone(request):
    name, task = request.param
    backbone = peftbench.load_backbone(name, task=task, registry=peftbench.get_registry())
    backbone.tokenizer.padding_side = "left" if backbone.spec.is_decoder else "right"
    return backbone


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_real_backbone_forward_backward(registry, real_backbone, method):
    backbone = real_backbone
    data = backbone.tokenizer(["a short test sentence", "hi there"], return_tensors="pt", padding=True)
    if backbone.task == "causal_lm":
        labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([0, 1])
    m, injection = inject(registry, backbone, method, n=4)
    try:
        assert backbone.count_trainable() == m.param_count(injection.config, backbone.spec)
        out = backbone.model(**data, labels=labels)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        if backbone.task == "causal_lm":
            assert out.logits.shape[:2] == data["input_ids"].shape
        grads = [p.grad for p in injection.named_parameters().values()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        trained = backbone.trainable_parameters(include_head=True)
        frozen = [p for n, p in backbone.model.named_parameters() if n not in trained]
        assert frozen and all(p.grad is None for p in frozen)
    finally:
        injection.remove()
        backbone.model.zero_grad(set_to_none=True)
