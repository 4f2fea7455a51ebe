"""Per-layer key/value prefixes through transformers' attention-function registry.

``attach_kv_prefix`` switches the model to the ``peftbench_kv_prefix`` attention function.
That function looks up the prefix of the calling attention module (the layout's layer
index is stored on the module), concatenates it in front of the keys and values (after any
cache update, so the cache never holds the prefix), widens the mask by the prefix columns
and calls SDPA. The matching mask function is registered under the same name and always
materialises a boolean mask (True = attend): otherwise padding would arrive as ``None``
and padded tokens would be attended silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "peftbench_kv_prefix"
_SLOT = "_peftbench_kv_prefix"


@dataclass
class _Slot:
    provider: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    layer: int


def _widen_mask(mask: torch.Tensor | None, module, query: torch.Tensor, key_len: int, n: int) -> torch.Tensor:
    """Mask over (prefix + keys); prefix columns are always attended."""
    batch, _, q_len, _ = query.shape
    if mask is None:
        if getattr(module, "is_causal", False) and q_len > 1:
            past = key_len - q_len
            rows = torch.arange(q_len, device=query.device)[:, None] + past
            cols = torch.arange(key_len, device=query.device)[None, :]
            mask = (cols <= rows)[None, None]  # (1, 1, q, k)
        else:
            mask = torch.ones(1, 1, q_len, key_len, dtype=torch.bool, device=query.device)
    mask = mask[..., -key_len:] if mask.shape[-1] > key_len else mask
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], n, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 = attend
        pad = torch.zeros(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    slot: _Slot | None = module.__dict__.get(_SLOT)
    if slot is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # query: (B, H, q, D); key/value: (B, H_kv, k, D); prefix: (B, H_kv, n, D)
    prefix_key, prefix_value = slot.provider(slot.layer, query.shape[0])
    n = prefix_key.shape[2]
    attention_mask = _widen_mask(attention_mask, module, query, key.shape[2], n)
    key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
    kwargs["is_causal"] = False  # the explicit mask carries causality
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prefix_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, prefix_attention)
AttentionMaskInterface.register(NAME, prefix_mask)


def attach_kv_prefix(backbone, provider, layers: list[int] | None = None) -> Callable[[], None]:
    """Install ``provider`` on the attention module of each layer; return the undo."""
    model = backbone.model
    before = model.config._attn_implementation
    modules = []
    for i in layers if layers is not None else range(backbone.spec.layers):
        attention = backbone.site(i, "attention").module
        attention.__dict__[_SLOT] = _Slot(provider, i)
        modules.append(attention)
    model.set_attn_implementation(NAME)

    def undo():
        for attention in modules:
            attention.__dict__.pop(_SLOT, None)
        model.set_attn_implementation(before)

    return undo
