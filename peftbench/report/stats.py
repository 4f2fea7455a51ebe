"""Statistics over seeds: mean, sample std, 95% t-interval, Welch's t-test, a one-sided test, ranking.

With n seeds the interval is mean ± t(0.975, n-1) · s / √n (Student's t, s the sample
standard deviation). Welch's t-test does not assume equal variances:
t = (m1 - m2) / √(s1²/n1 + s2²/n2), with Welch–Satterthwaite degrees of freedom.
The one-sided one-sample test of "better than a reference value μ" uses
t = (m - μ) / (s / √n) with n - 1 degrees of freedom (the sign flipped when lower is better).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

LEVEL = 0.95  # confidence level of the interval
ALPHA = 0.05  # significance level of the marks

_DIRECTIONS = {"max": "max", "maximize": "max", "higher": "max", "up": "max",
               "min": "min", "minimize": "min", "lower": "min", "down": "min"}


def direction_of(text: str | None) -> str:
    """'max' or 'min' (higher or lower is better); accepts maximize/higher/minimize/lower."""
    key = (text or "max").strip().lower()
    if key not in _DIRECTIONS:
        raise ValueError(f"direction {text!r} is not one of max, min (or maximize, minimize, higher, lower)")
    return _DIRECTIONS[key]


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1 in the denominator); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def ci(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Two-sided t-interval for the mean; None for fewer than 2 values."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std(values) / math.sqrt(n)
    m = mean(values)
    return m - half, m + half


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None when either side has fewer than 2 values.

    With no spread on either side the test is degenerate: p = 1 for equal means, 0 otherwise.
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if std(a) == 0 and std(b) == 0:
        return 1.0 if mean(a) == mean(b) else 0.0
    with warnings.catch_warnings():  # one side without spread (a method stuck at the majority class) is a
        warnings.simplefilter("ignore", RuntimeWarning)  # valid test; scipy's precision note is noise here
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def better_than_p(values: list[float], reference: float, direction: str = "max") -> float | None:
    """One-sided p-value of a one-sample t-test that the mean is better than ``reference``.

    Better: above it for ``max``, below it for ``min``. None when the test is undefined:
    fewer than 2 values, or no spread (the caller then compares the mean directly).
    """
    from scipy import stats

    sd = std(values)
    if sd is None or sd == 0:
        return None
    t = (mean(values) - reference) / (sd / math.sqrt(len(values)))
    if direction_of(direction) == "min":
        t = -t
    return float(stats.t.sf(t, len(values) - 1))


@dataclass
class Summary:
    """One method's primary metric over its seeds, with rank and test against the best.

    ``apart``: the method is not budget-matched; its rank is among the methods ranked apart only.
    """

    key: str
    values: list[float]
    mean: float = field(init=False)
    std: float | None = field(init=False)
    ci: tuple[float, float] | None = field(init=False)
    rank: int | None = None
    p_vs_best: float | None = None
    best: bool = False
    apart: bool = False

    def __post_init__(self):
        self.mean = mean(self.values)
        self.std = std(self.values)
        self.ci = ci(self.values)

    @property
    def n(self) -> int:
        return len(self.values)


def rank(summaries: list[Summary], direction: str, references: list[Summary] = ()) -> list[Summary]:
    """Competition ranks (1, 2, 2, 4) by mean in the task's direction, then Welch vs rank 1.

    The best is the first by mean (ties: first by key). Every other summary gets the
    p-value of Welch's test against the best's seeds. ``references`` (baselines outside the
    budget, e.g. full fine-tuning) are tested against that best too but get no rank.
    """
    ordered = order_ranks(summaries, direction)
    for i, s in enumerate(ordered):
        s.best = i == 0
    if ordered:
        top = ordered[0]
        for s in [*ordered[1:], *references]:
            s.p_vs_best = welch(top.values, s.values)
    return ordered


def order_ranks(summaries: list[Summary], direction: str) -> list[Summary]:
    """Competition ranks (1, 2, 2, 4) by mean in the task's direction (ties: by key); no test, no best."""
    sign = -1 if direction_of(direction) == "max" else 1
    ordered = sorted(summaries, key=lambda s: (sign * s.mean, s.key))
    for i, s in enumerate(ordered):
        s.rank = ordered[i - 1].rank if i and ordered[i - 1].mean == s.mean else i + 1
    return ordered


def mark(s: Summary, alpha: float = ALPHA) -> str:
    """'best', '*' (differs from the best at level alpha), 'n.s.', or '—' (under 2 seeds)."""
    if s.best:
        return "best"
    if s.p_vs_best is None:
        return "—"
    return "*" if s.p_vs_best < alpha else "n.s."
