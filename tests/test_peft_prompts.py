"""peft's prompt-learning tuners bridged (``peft:prompt_tuning``, ``peft:p_tuning``, ``peft:prefix_tuning``):
each equals peftbench's own twin (``prompt``, ``ptuning``, ``prefix`` / ``ptuning_v2``) at equal weights, on
every tiny architecture; the conformance kit runs them in test_method_contract.py with every method. The
twins themselves equal peft's ``PeftModel`` (test_prompts.py, test_kv_prefix.py)."""

from __future__ import annotations

import pytest
import torch

import peftbench
from conftest import ARCHS, DECODERS, padded, positions, tiny_backbone

REG = peftbench.get_registry()
N = 3


def _owned(injection) -> torch.nn.Module:
    (module,) = injection._owned.values()
    return module


def _pair(arch: str, ours: str, ours_cfg: dict, theirs: str, theirs_cfg: dict):
    """Both methods injected on two copies of the same tiny backbone: (ours, its injection, theirs, its injection)."""
    a, b = tiny_backbone(arch), tiny_backbone(arch)
    return a, peftbench.apply(REG.method(ours), a, ours_cfg), b, peftbench.apply(REG.method(theirs), b, theirs_cfg)


def _same_outputs(arch, a, b) -> None:
    data = padded(arch)
    kwargs = {"position_ids": positions(data["attention_mask"])} if arch in DECODERS else {}
    with torch.no_grad():
        got, expected = a.model(**data, **kwargs).logits, b.model(**data, **kwargs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _plain(arch):
    data = padded(arch)
    with torch.no_grad():
        return tiny_backbone(arch).model(**data).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_tuning_equals_ours(arch):
    a, ours, b, theirs = _pair(arch, "prompt", {"n": N}, "peft:prompt_tuning", {"num_virtual_tokens": N})
    with torch.no_grad():
        theirs.peft_module.embedding.weight.copy_(_owned(ours).prompt)
    _same_outputs(arch, a, b)
    with torch.no_grad():
        assert not torch.allclose(b.model(**padded(arch)).logits, _plain(arch), atol=1e-5)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_p_tuning_equals_ours(arch, encoder):
    a, ours, b, theirs = _pair(arch, "ptuning", {"n": N, "hidden": 16, "encoder": encoder}, "peft:p_tuning",
                               {"num_virtual_tokens": N, "options": {"encoder_hidden_size": 16,
                                                                    "encoder_reparameterization_type": encoder.upper()}})
    mine, peft_encoder = _owned(ours), theirs.peft_module
    with torch.no_grad():
        peft_encoder.embedding.weight.copy_(mine.embedding)
        peft_encoder.mlp_head.load_state_dict(mine.mlp.state_dict())
        if encoder == "lstm":
            peft_encoder.lstm_head.load_state_dict(mine.lstm.state_dict())
    assert ours.trainable_params == theirs.trainable_params  # the same parameters, counted alike
    _same_outputs(arch, a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_tuning_without_projection_equals_ptuning_v2(arch):
    """peft's flat prefix (n, L·2·kv_dim) is P-tuning v2's table (L, 2, kv_heads, n, head_dim) laid out again."""
    a, ours, b, theirs = _pair(arch, "ptuning_v2", {"n": N}, "peft:prefix_tuning", {"num_virtual_tokens": N})
    table = ours.table.prefix  # (L, 2, kv_heads, n, head_dim)
    with torch.no_grad():
        theirs.peft_module.embedding.weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(N, -1))
    assert ours.trainable_params == theirs.trainable_params
    _same_outputs(arch, a, b)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])  # GQA: peft's MLP input is kv_dim wide, ours d
def test_prefix_tuning_with_projection_equals_our_prefix(arch):
    a, ours, b, theirs = _pair(arch, "prefix", {"n": N, "hidden": 16}, "peft:prefix_tuning",
                               {"num_virtual_tokens": N, "options": {"prefix_projection": True,
                                                                    "encoder_hidden_size": 16}})
    table, encoder = ours.table, theirs.peft_module
    with torch.no_grad():
        encoder.embedding.weight.copy_(table.embedding)
        encoder.transform.load_state_dict(table.mlp.state_dict())
    assert ours.trainable_params == theirs.trainable_params
    _same_outputs(arch, a, b)


def test_solved_at_a_budget_and_bad_options_are_one_line_errors():
    backbone = tiny_backbone("bert")
    for name in ("peft:prompt_tuning", "peft:p_tuning", "peft:prefix_tuning"):
        method = REG.method(name)
        cfg = method.config()
        target = method.param_count(method.with_knob(cfg, 5), backbone.spec)
        sol = peftbench.solve(method, cfg, backbone.spec, str(target))
        assert sol.reachable and sol.value == 5 and sol.params == target
    with pytest.raises(peftbench.ConfigError, match=r"field 'options' sets \['token_dim'\]"):
        peftbench.apply(REG.method("peft:prefix_tuning"), backbone, {"options": {"token_dim": 8}})
    with pytest.raises(peftbench.ConfigError, match="peft:p_tuning.*PromptEncoderConfig refuses"):
        peftbench.apply(REG.method("peft:p_tuning"), backbone, {"options": {"no_such_field": 1}})
