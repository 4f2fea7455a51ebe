"""Run peft's prefix tuning for classification on transformers that name the KV cache ``cache``.

peft 0.21.2 (the newest release as of 2026-11) hands prefix tuning's key/value prefix to a
sequence-classification model only if the model's forward, or its transformer's (``bert``,
``transformer``, ``model``), has a ``past_key_values`` parameter. transformers 5.24 renamed
that parameter ``cache``, so peft raises "Model does not support past key values" before
the first step. ``bridge_cache_argument`` gives the outermost forward that has ``cache`` a
``past_key_values`` parameter that it passes on as ``cache``: peft's prefix encoder, mask and
head path then run unchanged. Causal LMs need nothing (peft passes the old name directly,
which transformers still accepts with a deprecation warning); bridging them is harmless.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


def bridge_cache_argument(peft_model) -> str:
    """Patch where peft looks for ``past_key_values``, if it is not there; returns a note or ''."""
    base = getattr(peft_model, "base_model", None)
    if not isinstance(base, nn.Module):
        return ""
    candidates = [("the model", base)]
    name = getattr(peft_model, "transformer_backbone_name", None)
    if name:
        candidates.append((f"`{name}`", base.get_submodule(name)))
    for where, module in candidates:
        params = inspect.signature(module.forward).parameters
        if "past_key_values" in params:
            return ""  # peft finds what it looks for
        if "cache" in params:
            _bridge(module, params)
            return (f"peft's prefix reaches {where} through `cache=` (peft 0.21 looks for `past_key_values`, "
                    f"which transformers 5.24 renamed; benchmarks/peft_compat.py)")
    return ""


def _bridge(module: nn.Module, params) -> None:
    original = module.forward

    @functools.wraps(original)
    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and kwargs.get("cache") is None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    var_kw = [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = inspect.signature(original).replace(parameters=[*rest, extra, *var_kw])
    module.forward = forward
