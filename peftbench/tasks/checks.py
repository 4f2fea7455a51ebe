"""Checks on a task's rows before any training: invalid text or labels, label columns that cannot
be classes, files too small to split. Each failure is one ``ConfigError`` line naming the rows
or the counts and what to do; what a user opted to drop comes back as a warning with counts."""

from __future__ import annotations

import math
from typing import Any

from peftbench.errors import ConfigError

#: whole cells that spreadsheets and pandas write for a missing value (compared case-insensitively)
MISSING_TEXT = ("nan", "null", "n/a", "#n/a")
#: a numeric label column with more distinct non-integer values than this looks continuous
CONTINUOUS_DISTINCT = 10
#: how many offending rows a message shows before "... (N in all)"
SHOWN = 5
DROP_HINT = "drop_invalid: true in the task entry (--drop-invalid on the command line)"


def invalid_text(value: Any) -> str | None:
    """Why ``value`` cannot be trained on as text (null, NaN, empty, blank, not text), else None."""
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "null/NaN"
    if not isinstance(value, str):
        return f"{type(value).__name__}, not text"
    if not value.strip():
        return "empty" if not value else "blank"
    if value.strip().lower() in MISSING_TEXT:
        return repr(value.strip())
    return None


def invalid_label(value: Any) -> str | None:
    """Why ``value`` is no label (null, NaN, an empty cell or a missing-value marker), else None."""
    if isinstance(value, (bool, int)) or (isinstance(value, float) and not math.isnan(value)):
        return None
    return invalid_text(value) if value is None or isinstance(value, (str, float)) else None


def bad_rows(columns: dict[str, list], label_column: str | None) -> dict[int, str]:
    """Row index -> what is wrong with it (first offending column), over text columns and the label."""
    found: dict[int, str] = {}
    for name, values in columns.items():
        why_fn = invalid_label if name == label_column else invalid_text
        for i, value in enumerate(values):
            why = why_fn(value)
            if why is not None and i not in found:
                found[i] = f"{name!r} {why}"
    return found


def describe_rows(rows: dict[int, str], first_row: int = 1, unit: str = "row") -> str:
    """``rows 4 ('text' null), 7 ('label' empty)``, the first few; rows counted from ``first_row``."""
    shown = ", ".join(f"{i + first_row} ({why})" for i, why in sorted(rows.items())[:SHOWN])
    more = f", ... ({len(rows)} in all)" if len(rows) > SHOWN else ""
    return f"{unit}{'s' if len(rows) > 1 else ''} {shown}{more}"


def check_rows(where: str, columns: dict[str, list], label_column: str | None, drop: bool,
               what: str = "", unit: str = "row") -> tuple[list[int], str | None]:
    """The row indices to keep and a warning (when some were dropped); an error naming the bad rows
    unless ``drop``. ``what`` names the rows' place (``the train split``) in the message."""
    n = len(next(iter(columns.values()), []))
    bad = bad_rows(columns, label_column)
    if not bad:
        return list(range(n)), None
    place = f" of {what}" if what else ""
    rows = describe_rows(bad, unit=unit)
    if not drop:
        raise ConfigError(f"{where}: {len(bad)} of {n} {unit}s{place} cannot be trained on (no text or no label): "
                          f"{rows}; fix them, or drop such rows with {DROP_HINT}")
    keep = [i for i in range(n) if i not in bad]
    return keep, f"{where}: dropped {len(bad)} of {n} {unit}s{place} without text or label ({rows}); {len(keep)} left"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_label_values(where: str, label_column: str, values: list) -> None:
    """A classification label column must hold at least two classes and look like classes."""
    seen = {str(v) for v in values if invalid_label(v) is None}
    if len(seen) < 2:
        only = f"only {sorted(seen)[0]!r}" if seen else "no label at all"
        raise ConfigError(f"{where}: the label column {label_column!r} has fewer than two classes ({only} in "
                          f"{len(values)} rows); a classifier needs at least two, so check the label column "
                          f"(--label-column) or the file")
    numbers = [_number(v) for v in seen]
    fractional = [v for v in numbers if v is not None and v != int(v)]
    if None not in numbers and fractional and len(seen) > CONTINUOUS_DISTINCT:
        examples = ", ".join(sorted(seen, key=float)[:3])
        raise ConfigError(f"{where}: the label column {label_column!r} looks continuous ({len(seen)} distinct numbers "
                          f"in {len(values)} rows, e.g. {examples}); peftbench trains classifiers: bin the values "
                          f"into classes first (or name the right column with --label-column)")


def check_carved(where: str, source: str, total: int, parts: dict[str, int], labels: int | None,
                 per_label: int) -> None:
    """An error when carving left a split empty: how many rows there are and how many it needs."""
    empty = [name for name, size in parts.items() if size == 0]
    if not empty:
        return
    needed = per_label * (labels or 1)
    of = f"each of {labels} label(s) needs {per_label}" if labels else f"it needs {per_label}"
    carved = " and ".join(name for name in parts if name != "train")
    raise ConfigError(f"{where}: {source} is too small for train/validation/test ({total} rows; at least {needed} "
                      f"needed: {carved} {'are each' if ' and ' in carved else 'is'} carved as 10% of every label, "
                      f"so {of}); add rows, or give your own validation and test rows (a split column)")


def absent_labels(where: str, counts: dict[str, dict[str, int]], carved: bool) -> list[str]:
    """Warnings for labels missing from a split (``counts``: label -> split -> rows)."""
    out = []
    for label, by_split in sorted(counts.items()):
        missing = [split for split in ("validation", "test") if not by_split.get(split)]
        if missing:
            shown = ", ".join(f"{split} {by_split.get(split, 0)}" for split in ("train", "validation", "test"))
            why = ("; a carved split takes 10% of each label, so a label needs at least 6 rows to reach both"
                   if carved else "")
            out.append(f"{where}: label {label!r} has too few rows for the splits ({shown}): it is never measured on "
                       f"{' and '.join(missing)}{why}")
    return out
