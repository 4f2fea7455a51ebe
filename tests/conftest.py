"""Shared fixtures: tiny random backbones of every built-in architecture (no hub)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

import peftbench  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
)

VOCAB = 64
ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama")


def tiny_config(arch: str):
    """A 2-layer, 32-wide config of ``arch``; llama uses GQA (4 heads, 2 kv heads)."""
    common = dict(vocab_size=VOCAB)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          max_position_embeddings=64, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                             max_position_embeddings=70, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                           pad_token_id=0, **common)
    raise KeyError(arch)


def tiny_backbone(arch: str, task: str = "classification", seed: int = 0, num_labels: int = 2,
                  registry=None) -> peftbench.Backbone:
    """A random tiny backbone of ``arch``; its layout comes from ``registry`` (default: every installed plugin)."""
    return peftbench.from_config(tiny_config(arch), task=task, num_labels=num_labels, seed=seed,
                                 registry=registry if registry is not None else peftbench.get_registry())


def tiny_batch(batch: int = 3, length: int = 7, seed: int = 1, pad: bool = True, left: bool = False):
    """input_ids and an attention mask with padding on row 1 (ids avoid 0..2).

    ``left=True`` pads on the left, as decoders are padded for classification.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad and batch > 1:
        cols = slice(0, 2) if left else slice(length - 2, length)
        mask[1, cols] = 0
        ids[1, cols] = 0
    return {"input_ids": ids, "attention_mask": mask}


DECODERS = ("gpt2", "llama")


def padded(arch: str, **kwargs):
    """tiny_batch with row 1 padded by 2: on the right for encoders, on the left for decoders."""
    return tiny_batch(left=arch in DECODERS, **kwargs)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (what generate computes)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def inject(registry, backbone, method: str, **cfg):
    """``peftbench.apply`` the registry's ``method`` with ``cfg`` (checked, frozen, verified); (method, injection)."""
    m = registry.method(method)
    return m, peftbench.apply(m, backbone, cfg)


def batch_for(backbone, **kwargs):
    """A padded batch the way the runner pads this backbone (decoders on the left)."""
    return tiny_batch(left=backbone.spec.is_decoder, **kwargs)


def fused_and_module_steps(backbone, injection, switches, forward, check=None) -> list[tuple]:
    """One training step with every module in ``switches`` fused, then one with none of them.

    Returns ``[(output, grads), (output, grads)]``; ``check(fused)`` runs after each backward.
    Both steps seed torch alike, so the backbone's own dropout draws the same masks.
    """
    backbone.model.train()
    runs = []
    for fused in (True, False):
        for module in switches:
            module.fused = fused
        backbone.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = forward()
        out.square().mean().backward()
        runs.append((out.detach(), {k: p.grad.clone() for k, p in injection.named_parameters().items()}))
        if check is not None:
            check(fused)
    return runs


def assert_same_step(runs) -> None:
    """The fused and module steps of ``fused_and_module_steps`` agree in output and every gradient."""
    (out_f, grads_f), (out_m, grads_m) = runs
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_m.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], atol=1e-5, rtol=1e-4)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def registry():
    return peftbench.get_registry()


@torch.no_grad()
def copy_lora_into_peft(wrappers: dict, inner, r: int) -> None:
    """Copy our LoRA wrappers' A and B (``{module path: LoRALinear}``) into peft's LoRA layers under
    ``inner``: a sliced wrapper's B_i go into one block-structured B of rank ``len(slices) * r``."""
    for path, w in wrappers.items():
        layer = inner.get_submodule(path)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.copy_(w.lora_A.weight)
        if not w.slices:
            b.copy_(w.lora_B.weight)
            continue
        b.zero_()
        for i, ((start, end), (lo, hi)) in enumerate(zip(w.slices, w.b_rows())):
            b[start:end, i * r:(i + 1) * r] = w.lora_B.weight[lo:hi]
