"""Per-layer key/value prefixes through transformers' attention-function registry.

``attach_kv_prefix`` switches the model to the ``peftbench_kv_prefix`` attention function.
That function looks up the prefix of the calling attention module (the layout's layer
index is stored on the module, because some attention modules, DistilBERT's, carry no
``layer_idx``), concatenates it in front of the keys and values (after any cache update, so
the cache never holds the prefix and position ids of real tokens are not shifted), widens
the mask by the prefix columns and calls SDPA. GQA prefixes have ``kv_heads`` heads: they
are concatenated before SDPA repeats key/value heads.

The matching mask function is registered under the same name and always materialises a
boolean mask (True = attend): otherwise padding would arrive as ``None`` and padded
tokens would be attended silently. The model builds that mask once per forward and hands
the same tensor to every layer, so the widened mask is memoised and built once, not L times.

A model that runs eager attention (Gemma 2, whose logit soft-capping SDPA cannot do) keeps
it: the prefix function then calls the eager attention function of the attention module's
own modeling file, with the widened mask turned into transformers' additive float form.

A family whose attention never calls the registry (DeBERTa's disentangled attention) names in its
layout a ``prefix_attention(module) -> undo`` that makes the module ask ``kv_prefix_for(module, key)``
for its prefix itself; the slots, the layer switch and the undo are the same.

A provider is ``provider(layer, batch) -> (key, value)``, each ``(kv_heads, n, head_dim)``
(shared by the batch, expanded here as a view) or ``(batch, kv_heads, n, head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sys

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from peftbench.errors import ConfigError

NAME = "peftbench_kv_prefix"
_SLOT = "_peftbench_kv_prefix"

Provider = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class _Prefix:
    """One attachment: the provider, and the widened mask of the current forward."""

    def __init__(self, provider: Provider, eager: bool = False):
        self.provider = provider
        self.eager = eager  # the model ran eager attention before: keep its own function
        self._memo: tuple | None = None  # (mask in, its version, n, q_len, key_len, mask out)

    def plain(self, mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
        """The mask of a layer without a prefix: as built, in additive form for eager attention."""
        return _additive(mask, query.dtype) if self.eager and mask is not None else mask

    def widen(self, mask: torch.Tensor | None, module, query: torch.Tensor, key_len: int, n: int) -> torch.Tensor:
        q_len = query.shape[2]
        # inference tensors (torch.inference_mode) keep no version counter: identity alone
        version = None if mask is None or mask.is_inference() else mask._version
        memo = self._memo
        # the memo holds the input mask, so its id cannot be reused while it is cached
        if memo is not None and memo[0] is mask and memo[1:5] == (version, n, q_len, key_len):
            return memo[5]
        out = _widen_mask(mask, module, query, key_len, n)
        if self.eager:
            out = _additive(out, query.dtype)
        self._memo = (mask, version, n, q_len, key_len, out)
        return out


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as eager attention adds it: 0 attends, the dtype's min masks."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


@dataclass
class _Slot:
    prefix: _Prefix
    layer: int
    active: bool = True  # False: a layer left without a prefix (it still runs the model's own function)
    enabled: bool = True  # off: the layer attends without its prefix (layer ablation)


class Attachment:
    """What ``attach_kv_prefix`` installed: call it to undo; ``slots``: layer -> its slot (``enabled``)."""

    def __init__(self, undo: Callable[[], None], slots: dict[int, _Slot]):
        self._undo = undo
        self.slots = slots

    def __call__(self) -> None:
        self._undo()


def _widen_mask(mask: torch.Tensor | None, module, query: torch.Tensor, key_len: int, n: int) -> torch.Tensor:
    """Mask over (prefix + keys), (B or 1, 1, q, n + k); prefix columns are always attended."""
    q_len = query.shape[2]
    if mask is None:  # only reached when a caller bypassed the registered mask function
        if getattr(module, "is_causal", False) and q_len > 1:
            rows = torch.arange(q_len, device=query.device)[:, None] + (key_len - q_len)
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


def _batched(prefix: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """(kv_heads, n, D) or (1 or B, kv_heads, n, D) -> (B, kv_heads, n, D), a view when shared."""
    if prefix.dim() == 3:
        prefix = prefix.unsqueeze(0)
    if prefix.dim() != 4 or prefix.shape[1] != key.shape[1] or prefix.shape[3] != key.shape[3]:
        raise ConfigError(
            f"kv prefix has shape {tuple(prefix.shape)}; the layer's keys need (batch, {key.shape[1]} kv heads, "
            f"n, {key.shape[3]} head_dim) or ({key.shape[1]}, n, {key.shape[3]})"
        )
    return prefix.to(key.dtype).expand(key.shape[0], -1, -1, -1)


def _eager_function(module) -> Callable | None:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    slot: _Slot | None = module.__dict__.get(_SLOT)
    if slot is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    attend = _eager_function(module) if slot.prefix.eager else sdpa_attention_forward
    if not (slot.active and slot.enabled):  # no prefix here, or switched off (layer ablation)
        return attend(module, query, key, value, slot.prefix.plain(attention_mask, query), **kwargs)
    # query: (B, H, q, D); key/value: (B, H_kv, k, D) after the cache update; prefix: (B, H_kv, n, D)
    prefix_key, prefix_value = slot.prefix.provider(slot.layer, query.shape[0])
    prefix_key, prefix_value = _batched(prefix_key, key), _batched(prefix_value, value)
    n = prefix_key.shape[2]
    attention_mask = slot.prefix.widen(attention_mask, module, query, key.shape[2], n)
    key = torch.cat([prefix_key, key], dim=2)  # (B, H_kv, n + k, D)
    value = torch.cat([prefix_value, value], dim=2)
    kwargs["is_causal"] = False  # the explicit mask carries causality
    return attend(module, query, key, value, attention_mask, **kwargs)


def kv_prefix_for(module, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For an attention module that puts prefixes in itself (a layout's ``prefix_attention``): its layer's
    (key, value) prefix, each (B, H_kv, n, D) like ``key`` (B, H_kv, k, D); None where the layer has no prefix
    or it is switched off (layer ablation)."""
    slot: _Slot | None = module.__dict__.get(_SLOT)
    if slot is None or not (slot.active and slot.enabled):
        return None
    prefix_key, prefix_value = slot.prefix.provider(slot.layer, key.shape[0])
    return _batched(prefix_key, key), _batched(prefix_value, key)


def prefix_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, prefix_attention)
AttentionMaskInterface.register(NAME, prefix_mask)


def attach_kv_prefix(backbone, provider: Provider, layers: list[int] | None = None) -> Attachment:
    """Install ``provider`` on the attention module of each layer; return the undo (an ``Attachment``)."""
    model = backbone.model
    before = model.config._attn_implementation
    sites = backbone.sites("attention")  # every layer: the ones without a prefix keep the model's function
    if before == NAME or any(_SLOT in s.module.__dict__ for s in sites):
        raise ConfigError(f"backbone {backbone.name!r} already carries a key/value prefix; remove it first")
    prefix = _Prefix(provider, eager=before == "eager")
    chosen = set(layers if layers is not None else range(backbone.spec.layers))
    own = backbone.layout.prefix_attention  # the family's attention puts the prefix in itself, or None
    if own is None:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:  # transformers declined: the prefix would be silently ignored
            raise ConfigError(f"backbone {backbone.name!r} ({backbone.layout.model_type}): its attention does not "
                              f"call transformers' attention-function registry, so a key/value prefix cannot be attached")
        if prefix.eager and any(_eager_function(s.module) is None for s in sites):
            model.set_attn_implementation(before)
            raise ConfigError(f"backbone {backbone.name!r} runs eager attention, but the module of its attention "
                              f"({type(sites[0].module).__name__}) has no eager_attention_forward to add a prefix to")
    slots = {}
    for site in sites:
        slot = site.module.__dict__[_SLOT] = _Slot(prefix, site.layer, site.layer in chosen)
        if slot.active:
            slots[site.layer] = slot
    undos = [own(site.module) for site in sites] if own is not None else []

    def undo():
        for undo_one in undos:
            undo_one()
        for site in sites:
            site.module.__dict__.pop(_SLOT, None)
        if own is None:
            model.set_attn_implementation(before)

    return Attachment(undo, slots)
