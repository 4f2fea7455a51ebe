"""Placement: which layers a per-layer method adapts, and how wide it is in each.

A per-layer method (one that puts the same thing in every transformer layer: adapters, LoRA,
per-layer key/value prefixes) declares its config as a ``PerLayerConfig`` (``contract.method``).
That adds these fields, parsed once for every method, built-in or third-party:

- ``layers``: which layers get the method. ``null``/``all`` (every layer), a list of indices
  (``[4, 5]``, or the string ``"4,5"``), ``top:K`` (the K highest), ``bottom:K`` (the K lowest)
  or ``every:N`` (the N-th, 2N-th, ... layer counted from the bottom, so the top layer is in
  when N divides the depth). The budget solver then gives the whole budget to those layers:
  ``param_count`` counts only them, so the knob comes out wider in fewer layers.
- ``layer_sizes``: one knob value per chosen layer (bottom to top) instead of the uniform knob;
  it pins the method's size like the knob does. A budget-preserving allocation writes it.
- ``allocation``: ``uniform`` (the solved knob in every chosen layer) or ``importance`` (the
  trial trains the uniform method for ``allocation_steps`` warm-up steps, scores each layer,
  and spreads the same total of knob units over the layers by score: ``running.allocation``);
  ``allocation_steps`` sets the warm-up's length.

The method reads the result through ``Method.layer_indices`` and ``Method.layer_knobs``.
"""

from __future__ import annotations

import re
from typing import Any

from peftbench.errors import ConfigError

LAYERS_ALLOWED = "a list of layer indices (e.g. [4, 5]), 'all', 'top:K', 'bottom:K' or 'every:N' (K, N >= 1)"
_RULE = re.compile(r"^(top|bottom|every):(\d+)$")


def parse_layers(value: Any) -> list[int] | str | None:
    """The canonical form of a ``layers`` value: None (all), a list of indices, or ``top:K`` /
    ``bottom:K`` / ``every:N``; ValueError (one line, naming what is allowed) otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text in ("", "all"):
            return None
        rule = _RULE.match(text)
        if rule:
            if int(rule[2]) < 1:
                raise ValueError(f"layers {value!r}: K and N must be >= 1; allowed: {LAYERS_ALLOWED}")
            return f"{rule[1]}:{int(rule[2])}"
        if re.fullmatch(r"\d+(,\d+)*", text):
            value = [int(v) for v in text.split(",")]
        else:
            raise ValueError(f"layers {value!r} is not understood; allowed: {LAYERS_ALLOWED}")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"layers {list(value)!r} must be non-negative integers; allowed: {LAYERS_ALLOWED}")
        if len(set(value)) != len(value):
            raise ValueError(f"layers {list(value)!r} lists a layer twice; allowed: {LAYERS_ALLOWED}")
        return sorted(value)
    raise ValueError(f"layers {value!r} is not understood; allowed: {LAYERS_ALLOWED}")


def resolve_layers(value: list[int] | str | None, depth: int, where: str = "") -> list[int]:
    """The layer indices (ascending) that ``value`` (``parse_layers``' form) means on a ``depth``-layer
    model; ConfigError when it names layers the model lacks."""
    value = parse_layers(value)
    if value is None:
        return list(range(depth))
    if isinstance(value, list):
        bad = [i for i in value if i >= depth]
        if bad:
            raise ConfigError(f"{where}field 'layers' has {bad}, not layers of a {depth}-layer model "
                              f"(allowed 0..{depth - 1})")
        return value
    rule, k = value.split(":")
    k = int(k)
    if rule in ("top", "bottom") and k > depth:
        raise ConfigError(f"{where}field 'layers' = {value!r} asks for {k} layers of a {depth}-layer model "
                          f"(allowed {rule}:1..{rule}:{depth})")
    if rule == "top":
        return list(range(depth - k, depth))
    if rule == "bottom":
        return list(range(k))
    if k > depth:
        raise ConfigError(f"{where}field 'layers' = {value!r} selects no layer of a {depth}-layer model "
                          f"(allowed every:1..every:{depth})")
    return list(range(k - 1, depth, k))


__all__ = ["parse_layers", "resolve_layers", "LAYERS_ALLOWED"]
