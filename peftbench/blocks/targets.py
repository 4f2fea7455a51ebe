"""Choosing linear sites by name, for methods with a ``targets`` field (the LoRA family's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftbench.backbones.layout import LINEAR_SITES
from peftbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import BackboneSpec

#: ``targets`` meaning every linear site the backbone has
ALL_LINEAR = "all-linear"


def target_names(method: str, targets: list[str] | str, spec: "BackboneSpec") -> list[str]:
    """The linear site names ``targets`` means on ``spec`` (``all-linear``: every one it has)."""
    if targets == ALL_LINEAR:
        return [n for n in LINEAR_SITES if n in spec.site_shapes]
    missing = [n for n in targets if n not in spec.site_shapes]
    if missing:
        raise ConfigError(
            f"method {method!r}: field 'targets' names {missing}, which {spec.name} ({spec.model_type}) lacks; "
            f"it has: {', '.join(n for n in LINEAR_SITES if n in spec.site_shapes)} (or {ALL_LINEAR!r})"
        )
    return list(targets)


def validate_targets(value):
    """Accept 'all-linear', a list of linear site names, or a comma-separated string of them."""
    if isinstance(value, str) and value != ALL_LINEAR:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        bad = [v for v in value if v not in LINEAR_SITES]
        if bad or not value:
            raise ValueError(f"targets must be {ALL_LINEAR!r} or linear site names from "
                             f"{', '.join(LINEAR_SITES)}; got {value}")
        value = list(dict.fromkeys(value))  # drop repeats, keep order
    return value


def max_rank(names: list[str], spec: "BackboneSpec") -> int:
    """The largest rank every one of the sites ``names`` allows: min over them of min(d_in, d_out)."""
    return min(min(spec.site_shapes[n]) for n in names)
