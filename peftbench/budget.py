"""Budgets: parse ``3%`` / ``500k`` and solve the knob that hits them, arithmetic on a spec.

The budget counts a method's trainable parameters during training, relative to the
backbone's parameters without the task head (the head is shared by every method and
reported in its own column). Nothing here builds a model: counting by instantiation is
``peftbench.apply`` / ``peftbench.measure`` (``peftbench.contract.apply``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal

from peftbench.errors import BudgetError

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}
_UNIT = {"": "", "k": "k", "m": "M", "b": "B", "%": "%"}  # how a budget's unit is written once normalised
_BUDGET = re.compile(r"^\s*(?P<num>-?(?:\d+(?:\.\d+)?|\.\d+))\s*(?P<unit>%|[kKmMbB])?\s*$")


@dataclass(frozen=True)
class Budget:
    """A fraction of the backbone's parameters, or an absolute count."""

    text: str
    fraction: float | None = None
    count: int | None = None

    @property
    def key(self) -> tuple[float | None, int | None]:
        """What makes two budgets one (``1M`` and ``1000k``, ``1%`` and ``1.0%``), whatever their text."""
        return self.fraction, self.count

    def target(self, base_params: int) -> int:
        if self.count is not None:
            return self.count
        return int(round(self.fraction * base_params))

    def __str__(self) -> str:
        return self.text


def parse_budget(text: str | int | float | Budget) -> Budget:
    """``3%``, ``0.5%``, ``500k``, ``2M``, ``123456``. A bare ``3`` is ambiguous and refused.

    The text is normalised (``"3 %"`` and ``3.0%`` are ``3%``, ``1.50m`` is ``1.5M``): one budget, one name.
    """
    if isinstance(text, Budget):
        return text
    raw = str(text)
    allowed = "allowed: a percentage in (0%, 100%] such as 3% or 0.5%, or a count such as 500k, 2M, 123456"
    m = _BUDGET.match(raw)
    if not m:
        raise BudgetError(f"budget {raw!r} is malformed; {allowed}")
    num, unit = float(m["num"]), (m["unit"] or "")
    text = format(Decimal(m["num"]).normalize(), "f") + _UNIT[unit.lower()]
    if unit == "%":
        if not 0 < num <= 100:
            raise BudgetError(f"budget {raw!r} is out of range; {allowed}")
        return Budget(text, fraction=num / 100)
    count = num * _SUFFIX[unit.lower()]
    if count < 0:
        raise BudgetError(f"budget {raw!r} is out of range; {allowed}")
    if count != int(count) or count < 1:
        raise BudgetError(f"budget {raw!r} is not a whole number of parameters; {allowed}")
    if unit == "" and count < 100:
        raise BudgetError(
            f"budget {raw!r} is ambiguous: write {raw}% for a fraction or a count of parameters (>= 100); {allowed}"
        )
    return Budget(text, count=int(count))


@dataclass
class Solution:
    """What the solver found for one method on one backbone."""

    method: str
    knob: str | None
    value: int | None
    params: int  # trainable during training, head excluded
    stored: int
    target: int | None
    base_params: int
    reachable: bool
    low: int | None = None  # feasible params range
    high: int | None = None
    knob_low: int | None = None
    knob_high: int | None = None
    verified: bool | None = None
    measured: int | None = None
    note: str = ""
    #: why the method refuses this backbone when applied (a ConfigError: a site it needs is missing ...); "" if not
    refused: str = ""
    #: parameters one knob step adds at the solved value (the budget's granularity); None without a budget
    step: int | None = None
    #: config values the solver chose besides the knob (a secondary width), to apply with it
    updates: dict = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return self.params / self.base_params

    @property
    def rel_error(self) -> float | None:
        if not self.target:
            return None
        return (self.params - self.target) / self.target

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_pct"] = 100 * self.achieved
        d["rel_error"] = self.rel_error
        return d


def solve(method, cfg, spec, budget: Budget | str | None, fixed: frozenset[str] | set[str] = frozenset()) -> Solution:
    """The knob whose param_count is closest to the budget's target (binary search).

    ``param_count`` must be non-decreasing in the knob. When the knob alone cannot reach the
    budget and the method declares a ``secondary`` width that the user did not set (not in
    ``fixed``), the solver takes the largest of ``method.secondary_values`` with which the
    budget is reached with the knob at no less than its default (the choice is in
    ``Solution.updates`` and its note). An unreachable budget gives
    a ``Solution`` with ``reachable=False``, the feasible range and the nearest feasible knob;
    callers decide whether that is an error (``solve_or_raise``).
    """
    sol = _solve_knob(method, cfg, spec, budget)
    name = getattr(method, "secondary", None)
    if sol.reachable or not name or name in fixed or budget is None:
        return sol
    floor = method.knob_value(method.config(cfg))  # the knob's default: the prefix must not shrink below it
    for value in method.secondary_values(method.config(cfg), spec):
        found = _solve_knob(method, method.config(cfg, **{name: value}), spec, budget)
        if found.reachable and found.value >= floor:
            found.updates = {name: value}
            found.note = (f"{name}={value} chosen by the solver: the largest {name} with which the budget is reached "
                          f"at {method.knob} >= {floor} (its default); at the default {name} "
                          f"{sol.note.removeprefix('not reachable: ')}")
            return found
    return sol


def _solve_knob(method, cfg, spec, budget: Budget | str | None) -> Solution:
    cfg = method.config(cfg)
    if not method.budgeted or method.knob is None or budget is None:
        params = method.param_count(cfg, spec)
        return Solution(method.name, method.knob, method.knob_value(cfg), params, method.stored_count(cfg, spec),
                        None, spec.base_params, reachable=True, note="budget does not apply")
    budget = parse_budget(budget)
    target = budget.target(spec.base_params)
    values = method.knob_values(cfg, spec)  # allowed knob values when not every integer in range is
    lo, hi = (0, len(values) - 1) if values is not None else method.knob_range(cfg, spec)
    if lo > hi:
        raise BudgetError(f"method {method.name!r} has no valid {method.knob} on {spec.name}")
    knob_at = values.__getitem__ if values is not None else int  # search position -> knob value

    probed: dict[int, int] = {}

    def count(k: int) -> int:
        value = knob_at(k)  # probed by knob value, so a broken premise is named in the knob's own values
        if value not in probed:
            probed[value] = method.param_count(method.with_knob(cfg, value), spec)
        return probed[value]

    c_lo, c_hi = count(lo), count(hi)
    # binary search: the smallest k with count(k) >= target
    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        if count(mid) >= target:
            b = mid
        else:
            a = mid + 1
    best = a
    if a > lo and abs(count(a - 1) - target) <= abs(count(a) - target):
        best = a - 1
    params = count(best)
    # reachable when the target lies within half a knob step of the feasible range
    step_lo = (count(lo + 1) - c_lo) if hi > lo else c_lo
    step_hi = (c_hi - count(hi - 1)) if hi > lo else c_hi
    reachable = c_lo - step_lo / 2 <= target <= c_hi + step_hi / 2
    best_cfg = method.with_knob(cfg, knob_at(best))
    note = "" if reachable else (
        f"not reachable: {method.name} spans {c_lo:,}..{c_hi:,} params "
        f"({100 * c_lo / spec.base_params:.4g}%..{100 * c_hi / spec.base_params:.4g}%) "
        f"with {method.knob} in {knob_at(lo)}..{knob_at(hi)}; nearest feasible: {method.knob}={knob_at(best)} "
        f"({params:,} params)"
    )
    step = count(best + 1) - params if best < hi else (params - count(best - 1) if best > lo else None)
    broken = not_monotone(method, probed)
    if broken:
        reachable, note = False, broken
    return Solution(method.name, method.knob, knob_at(best), params, method.stored_count(best_cfg, spec), target,
                    spec.base_params, reachable, c_lo, c_hi, knob_at(lo), knob_at(hi), note=note, step=step)


def not_monotone(method, counts: dict[int, int]) -> str:
    """Why the counts at the knob values the solver probed break its premise (non-decreasing in the
    knob), or "" when they do not."""
    ordered = sorted(counts.items())
    for (a, ca), (b, cb) in zip(ordered, ordered[1:]):
        if cb < ca:
            return (f"param_count of {method.name} is not monotone in {method.knob}: {method.knob}={a} gives {ca:,} "
                    f"params but {method.knob}={b} gives {cb:,}; the solver needs it non-decreasing in the knob")
    return ""


def solved_config(method, cfg, sol: Solution):
    """``cfg`` at the solution: its secondary width (if the solver chose one) and its knob."""
    if sol.value is None or sol.target is None:
        return method.config(cfg)
    return method.with_knob(method.config(cfg, **sol.updates), sol.value)


def solve_or_raise(method, cfg, spec, budget) -> Solution:
    sol = solve(method, cfg, spec, budget)
    if not sol.reachable:
        raise BudgetError(f"budget {budget} ({sol.target:,} params) on {spec.name}: {sol.note}")
    return sol
