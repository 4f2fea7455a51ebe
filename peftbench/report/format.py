"""How the report writes numbers, and the one markdown table renderer every section uses.

Every figure in ``report.md`` goes through these functions, so a number reads the same in
every table (built-in or plugin). Scores keep a fixed number of decimals per column
(``decimals_for``); sizes and durations keep three significant digits (``sig3``), enough to
compare methods without pretending to a precision one run does not have.
"""

from __future__ import annotations

import math
import re

#: a method whose trainable parameters miss the budget's target by more than one knob step
OFF_BUDGET = "⚠"
#: a reference baseline (full fine-tuning, the head alone): the budget solver did not size it
NOT_SOLVED = "†"
#: a method that is not budget-matched (unreachable, or pinned outside the tolerance): ranked apart
APART = "‡"
#: an empty cell: no value recorded
NONE = "—"


# -- numbers ---------------------------------------------------------------------------------
def sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept: 1.00, 0.0312, 12.5, 100; thousands grouped."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    text = f"{value:#.3g}"  # '#' keeps trailing zeros (1.00) but leaves a bare point (100.)
    return text[:-1] if text.endswith(".") else text


def fmt_params(n: float | None) -> str:
    """A parameter count, in full with thousands separators: 22,713,216."""
    return NONE if n is None else f"{int(n):,}"


def fmt_short(n: float) -> str:
    """22.7M, 227k, 1M, 512 (plot labels)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def fmt_pct(value: float | None) -> str:
    return NONE if value is None else f"{sig3(value)}%"


def fmt_signed_pct(value: float | None) -> str:
    """A percentage with its sign always shown: +1.44%, -0.984%."""
    text = fmt_pct(value)
    return text if text.startswith("-") or text == NONE else "+" + text


def _bytes_unit(n: float) -> tuple[str, float]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return unit, size
    return "B", 1


def fmt_bytes(n: float | None) -> str:
    """Binary units (KiB = 1024 B), three significant digits: 900 KiB, 1.07 MiB."""
    if n is None:
        return NONE
    unit, size = _bytes_unit(n)
    return f"{int(n)} B" if unit == "B" else f"{sig3(n / size)} {unit}"


def _seconds_unit(s: float) -> tuple[str, float]:
    if s < 1:
        return "ms", 1e-3
    if s < 100:
        return "s", 1
    if s < 6000:
        return "min", 60
    return "h", 3600


def fmt_seconds(s: float | None) -> str:
    """A duration in the unit that keeps it readable: 200 ms, 95.0 s, 12.5 min, 2.00 h."""
    if s is None:
        return NONE
    unit, size = _seconds_unit(s)
    return f"{sig3(s / size)} {unit}"


def fmt_ratio(value: float | None) -> str:
    """A ratio to a reference (inference time with the method / without it): 1.05×."""
    return NONE if value is None else f"{value:.2f}×"


def fmt_count(value: float | None) -> str:
    """A count; a mean over seeds that is not whole keeps three significant digits."""
    if value is None:
        return NONE
    return f"{int(value):,}" if float(value).is_integer() else sig3(value)


def fmt_p(p: float | None) -> str:
    """A p-value as the tables print it: p=0.060, p<0.001 (empty when there is no test)."""
    if p is None:
        return ""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def decimals_for(values: list[float]) -> int:
    """Metric decimals for a column: 0.xxx for scores within ±10, fewer for BLEU-like scales."""
    top = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0)
    return 3 if top < 10 else 2 if top < 100 else 1


def fmt_value(value) -> str:
    """A configuration or search value as text: 0.003, 1e-05, 16, adamw."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def fmt_num(value: float | None, decimals: int) -> str:
    return NONE if value is None else f"{value:.{decimals}f}"


#: how a method's own cost figure (``TrialResult.costs``) is written, by its unit
COST_FORMATS = {
    "bytes": fmt_bytes,
    "params": lambda v: fmt_params(None if v is None else round(v)),
    "seconds": fmt_seconds,
    "ratio": fmt_ratio,
    "count": fmt_count,
}


def fmt_cost(value: float | None, unit: str) -> str:
    """A cost figure in its unit's format (an unknown unit: three significant digits)."""
    if value is None:
        return NONE
    return COST_FORMATS.get(unit, sig3)(value)


def fmt_spread(values: list[float], unit: str) -> str:
    """The mean of a figure over seeds in its unit's format, and its range when the seeds differ, in the
    mean's unit: '305 ms (290–320)', '1.52 GiB (1.50–1.55)', '1.13× (1.05–1.21)'; '—' for no values."""
    if not values:
        return NONE
    mean = math.fsum(values) / len(values)
    text = fmt_cost(mean, unit)
    low, high = min(values), max(values)
    if len(values) < 2 or low == high:
        return text
    if unit == "seconds":
        size = _seconds_unit(mean)[1]
    elif unit == "bytes":
        size = _bytes_unit(mean)[1]
    else:
        size = 1
    scaled = (f"{v:.2f}" if unit == "ratio" else sig3(v / size) for v in (low, high))
    return f"{text} ({'–'.join(scaled)})"


# -- markdown --------------------------------------------------------------------------------
def slug(*parts: str) -> str:
    """A file-name-safe name from parts: ('curves', 'sst2', '1%') -> 'curves-sst2-1pct'."""
    text = "-".join(str(p).replace("%", "pct") for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cell(text) -> str:
    """Markdown-safe, one-line table cell."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|").strip()


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A GitHub table whose pipes line up in the source too; ``right`` = right-aligned columns."""
    cells = [[cell(c) for c in r] for r in [headers, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return [line(cells[0]), sep, *(line(r) for r in cells[1:])]
