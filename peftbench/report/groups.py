"""Trials grouped the way the report compares them: one group per (task, backbone, budget).

A group holds one ``MethodResult`` per method (and knob value) with the trials of its seeds
and its diagnostics (``diagnostics.diagnose``). Budget-matched methods compete in their group:
each gets a ``stats.Summary`` of its primary metric over seeds, a rank by mean, and Welch's
test against the best. Methods that are not budget-matched (an unreachable budget trained at
the nearest feasible size, a size pinned outside the tolerance) are ranked apart: among
themselves, tested against the same best, never rank 1 of the group. Reference baselines
(full fine-tuning, the head alone) are not sized by the budget solver; they join every budget
of their task and backbone, are tested against the same best, and are not ranked.

Only final trials are compared: search trials are selected on validation and carry no test
metric; a group keeps them apart (``Group.searches``) for its search section.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import peftbench.report.stats as stats
from peftbench.report.diagnostics import Check, diagnose
from peftbench.errors import ConfigError
from peftbench.results.records import TrialRecord, TrialResult, TrialSpec


def is_reference(spec: TrialSpec) -> bool:
    """A baseline the budget solver did not size (full fine-tuning, the head alone)."""
    return not spec.knob or spec.target_params is None


def is_apart(spec: TrialSpec) -> bool:
    """Sized by the solver but not budget-matched (unreachable, or pinned outside the tolerance): ranked apart."""
    return not is_reference(spec) and not spec.matched


def budget_order(specs: list[TrialSpec], budget: str | None) -> tuple:
    """Budgets sort by their smallest target (1% before 3%, whatever their text), then by text."""
    targets = [s.target_params for s in specs if s.budget == budget and s.target_params]
    return (min(targets) if targets else math.inf, budget or "")


@dataclass
class MethodResult:
    """One method (at one knob value) in one (task, backbone, budget) group."""

    method: str
    knob: str | None
    knob_value: int | None
    done: list[TrialRecord] = field(default_factory=list)
    other: list[TrialRecord] = field(default_factory=list)  # failed / diverged / running / unreachable
    summary: stats.Summary | None = None
    label: str = ""  # the method's name, with its knob when one table holds it twice
    checks: list[Check] = field(default_factory=list)  # the row's diagnostics, in ``diagnostics.CHECKS`` order

    @property
    def first(self) -> TrialRecord:
        return (self.done or self.other)[0]

    @property
    def spec(self) -> TrialSpec:
        """The planner's facts about this method's size (the same for every seed)."""
        return self.first.spec

    @property
    def results(self) -> list[TrialResult]:
        """What the finished seeds returned."""
        return [r.result for r in self.done if r.result is not None]

    def values(self, metric: str, which: str = "metrics") -> list[float]:
        """The finite numeric values of ``metric`` over finished seeds (``which``: metrics / val_metrics)."""
        out = []
        for result in self.results:
            v = getattr(result, which).get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def check(self, code: str) -> Check | None:
        """The row's diagnostic named ``code`` (``diagnostics.CHECKS``), if computed."""
        return next((c for c in self.checks if c.code == code), None)

    def mean_of(self, value: Callable[[TrialResult], float | None]) -> float | None:
        """Mean of one figure over the finished seeds that recorded it (None if none did)."""
        found = [v for v in map(value, self.results) if v is not None]
        return stats.mean(found) if found else None


@dataclass
class Group:
    """The trials of one (task, backbone, budget); ``budget`` None: no method was budget-solved."""

    task: str
    backbone: str
    budget: str | None
    primary: str
    direction: str
    methods: list[MethodResult]
    searches: list[TrialRecord] = field(default_factory=list)  # the search trials of this group's methods

    @property
    def target(self) -> int | None:
        targets = [m.spec.target_params for m in self.methods if not is_reference(m.spec)]
        return targets[0] if targets else None

    @property
    def finished(self) -> list[MethodResult]:
        """Methods with at least one finished seed, in table order (see ``order_key``)."""
        return sorted((m for m in self.methods if m.done), key=lambda m: order_key(m, self.direction))


def order_key(m: MethodResult, direction: str) -> tuple:
    """Ranked methods by rank, then those ranked apart, then unranked baselines by metric (best first),
    then methods with no value."""
    s = m.summary
    if s is None:
        return (3, 0.0, m.method)
    if s.rank is None:
        return (2, (-1 if stats.direction_of(direction) == "max" else 1) * s.mean, m.method)
    return (1 if s.apart else 0, s.rank, m.method)


def off_budget(m: MethodResult) -> tuple[bool, int | None, bool]:
    """(flagged, knob step, step estimated): |achieved - target| > one knob step of params.

    One knob step is the closest a solver can get, so only a miss larger than that is a
    mismatch worth flagging. A trial that recorded no step gets trainable / knob value.
    """
    spec = m.spec
    if is_reference(spec):
        return False, None, False
    step, estimated = spec.knob_step, False
    if not step and m.knob_value:
        step, estimated = spec.trainable_params / m.knob_value, True
    if not step:
        return False, None, False
    return abs(spec.trainable_params - spec.target_params) > step, step, estimated


def by_task_backbone(groups: list[Group]) -> dict[tuple[str, str], list[Group]]:
    """The groups of each (task, backbone), budgets in order."""
    out: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        out[(g.task, g.backbone)].append(g)
    return dict(out)


# -- building the groups ---------------------------------------------------------------------
def build_groups(records: list[TrialRecord]) -> list[Group]:
    """(task, backbone, budget) groups of the final trials; unbudgeted baselines join each budget."""
    finals: dict[tuple[str, str], list[TrialRecord]] = defaultdict(list)
    searches: dict[tuple[str, str], list[TrialRecord]] = defaultdict(list)
    for r in records:
        (finals if r.spec.role == "final" else searches)[(r.spec.task.name, r.spec.backbone)].append(r)
    groups = []
    for (task, backbone), members in sorted(finals.items()):
        primary, direction = primary_of(task, [r.spec for r in members])
        budgets = _split_by_budget(members)
        searched = dict(_split_by_budget(searches.get((task, backbone), []), [b for b, _ in budgets]))
        for budget, budget_members in budgets:
            methods = _method_results(budget_members)
            _summarise(methods, primary, direction)
            for m in methods:
                m.checks = diagnose(m.done, m.other, primary, direction)
            groups.append(Group(task, backbone, budget, primary, direction, methods, searched.get(budget, [])))
    return groups


def primary_of(task: str, specs: list[TrialSpec]) -> tuple[str, str]:
    """The task's primary metric and direction: what most of its trials name."""
    named = [(s.primary_metric, s.direction) for s in specs if s.primary_metric]
    if not named:
        return "metric", "max"
    (metric, direction), _ = Counter(named).most_common(1)[0]
    try:
        return metric, stats.direction_of(direction)
    except ValueError as exc:
        raise ConfigError(f"task {task!r}, metric {metric!r}: {exc}") from None


def _split_by_budget(records: list[TrialRecord], budgets: list[str | None] | None = None,
                     ) -> list[tuple[str | None, list[TrialRecord]]]:
    """(budget, its trials) in budget order; trials under no solved budget join every one.

    Budgets are the texts that sized some method (or ``budgets``, the final trials' ones, for
    search trials); a baseline stored under another text (None, "n/a") belongs to no budget and
    is compared in all of them. With no budget at all there is one group (budget None) holding
    every trial.
    """
    specs = [r.spec for r in records]
    if budgets is None:
        budgets = sorted({s.budget for s in specs if s.budget and not is_reference(s)},
                         key=lambda b: budget_order(specs, b))
    budgets = [b for b in budgets if b]
    if not budgets:
        return [(None, records)]
    unbudgeted = [r for r in records if r.spec.budget not in budgets and is_reference(r.spec)]
    return [(b, [r for r in records if r.spec.budget == b] + unbudgeted) for b in budgets]


def _method_results(records: list[TrialRecord]) -> list[MethodResult]:
    """One MethodResult per (method, knob, knob value), sorted by name then knob value."""
    by_method: dict[tuple, MethodResult] = {}
    for r in records:
        key = (r.spec.display, r.spec.knob, r.spec.knob_value)
        m = by_method.setdefault(key, MethodResult(*key))
        (m.done if r.status == "done" else m.other).append(r)
    methods = sorted(by_method.values(), key=lambda m: (m.method, m.knob_value or 0))
    twice = {name for name, n in Counter(m.method for m in methods).items() if n > 1}
    for m in methods:
        m.label = f"{m.method} ({m.knob}={m.knob_value})" if m.method in twice else m.method
    return methods


def _summarise(methods: list[MethodResult], primary: str, direction: str) -> None:
    """Summaries of the primary metric, ranks among budget-matched methods, Welch vs the best.

    Budget-matched methods compete; methods ranked apart get ranks among themselves only;
    both they and baselines the budget does not apply to are tested against the best
    budget-matched method (a table of baselines only ranks the baselines).
    """
    with_values = [m for m in methods if m.values(primary)]
    for m in with_values:
        key = m.method if m.knob_value is None else f"{m.method}:{m.knob_value}"
        m.summary = stats.Summary(key, m.values(primary), apart=is_apart(m.spec))
    matched = [m.summary for m in with_values if not is_reference(m.spec) and not is_apart(m.spec)]
    apart = [m.summary for m in with_values if is_apart(m.spec)]
    refs = [m.summary for m in with_values if is_reference(m.spec)]
    stats.rank(matched or refs, direction, [*refs, *apart] if matched else [])
    stats.order_ranks(apart, direction)
