"""The checks every row of a results table gets, computed once from its trials' records.

Each check looks at one method (at one knob value) in one (task, backbone, budget) group,
over its final trials, and ends in one state: flagged, ok, not recorded (the store lacks
what the check needs: trials stored before the field existed), not computed (the task has
no majority-class score, a search space of an unknown shape), or not applicable (no
finished seed, no search).

- ``chance`` (did not learn): the test primary metric is not significantly better than the
  majority-class score of the same test set (``TrialResult.chance``): one-sided one-sample
  t-test of the per-seed differences (metric − chance) against 0, flagged when p ≥ α; with
  one seed or no spread, flagged when the mean difference is not better than 0.
- ``cap`` (still improving at the cap): some seed kept the weights of its last validation
  pass (``best_step == last_eval_step``) and was not stopped early: more steps might help.
- ``edge`` (chosen at the edge of the search space): a selected value (``search_params``) lies
  in the outer 10% of its range (measured on a log scale when the space is log), or is the
  first or last of a numeric choice list.
- ``diverged``: some seed diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import peftbench.report.stats as stats
from peftbench.report.format import decimals_for, fmt_num, fmt_p, fmt_value
from peftbench.results.records import TrialRecord, TrialResult

FLAGGED, OK, NOT_RECORDED, NOT_COMPUTED, NOT_APPLICABLE = "flagged", "ok", "not recorded", "not computed", "n/a"
#: the fraction of a range, at each end, that counts as its edge
EDGE = 0.10

#: code -> (name, exact meaning): the legend of the Diagnostics column
CHECKS = {
    "chance": ("did not learn", "the test primary metric is not significantly better than always predicting "
                                "train's majority class (one-sided one-sample t-test over seeds of metric − "
                                f"majority-class score, level α = {stats.ALPHA}; with one seed or no spread: "
                                "the mean is not better than that score)"),
    "cap": ("still improving at the cap", "some seed's best validation score came at its last validation pass and "
                                          "early stopping did not end it: longer training might have helped"),
    "edge": ("chosen at the edge of the search space", f"a selected search value lies in the outer {EDGE:.0%} of its "
                                                       "range (log scale when the space is log) or is the first or "
                                                       "last of a numeric choice list"),
    "diverged": ("a seed diverged", "some seed of the method diverged (its reason is under *Failed and unfinished trials*)"),
}


@dataclass(frozen=True)
class Check:
    """One check of one row: ``code`` (a key of CHECKS), ``state`` and ``why`` (one line, for the summary)."""

    code: str
    state: str
    why: str = ""

    @property
    def cell(self) -> str:
        """What the Diagnostics column shows: the code when flagged, 'code?' when not recorded, else nothing."""
        return {FLAGGED: self.code, NOT_RECORDED: f"{self.code}?"}.get(self.state, "")


def cell(checks: list[Check]) -> str:
    """The Diagnostics cell of a row: its codes, or 'ok' when nothing is flagged or unknown."""
    return " ".join(c.cell for c in checks if c.cell) or "ok"


def diagnose(done: list[TrialRecord], other: list[TrialRecord], primary: str, direction: str) -> list[Check]:
    """Every check of one row, in CHECKS order: ``done`` its finished seeds, ``other`` the rest."""
    finals = [r for r in [*done, *other] if r.spec.role == "final"]
    return [did_not_learn(done, primary, direction), still_improving(done), at_edge(finals), diverged(finals)]


# -- did not learn ---------------------------------------------------------------------------
def did_not_learn(done: list[TrialRecord], primary: str, direction: str) -> Check:
    pairs = [(r.result.metrics[primary], r.result.chance[primary]) for r in done
             if r.result is not None and _number(r.result.metrics.get(primary)) and _number(r.result.chance.get(primary))]
    if not pairs:
        return Check("chance", *_why_no_chance(done))
    values, chances = [v for v, _ in pairs], [c for _, c in pairs]
    sign = 1 if stats.direction_of(direction) == "max" else -1
    gain = stats.mean([sign * (v - c) for v, c in pairs])
    p = stats.better_than_p([v - c for v, c in pairs], 0.0, direction)
    learned = gain > 0 if p is None else p < stats.ALPHA
    decimals = decimals_for([*values, *chances])
    spread = "" if len(values) < 2 else f" ± {fmt_num(stats.std(values), decimals)}"
    seeds = f"over {len(values)} seeds" if len(values) > 1 else "(one seed)"
    chance = fmt_num(stats.mean(chances), decimals) + ("" if len(set(chances)) == 1 else " (mean over seeds)")
    found = f"{primary} {fmt_num(stats.mean(values), decimals)}{spread} {seeds} vs {chance} for the majority class"
    if p is None:
        why = found + (": better" if learned else ": not better") + \
            (" (one seed: no test)" if len(values) < 2 else " (no spread over seeds: no test)")
    else:
        why = (found + f": {'significantly better' if learned else 'not significantly better'} (one-sided t-test, "
               f"{fmt_p(p)} {'<' if learned else '≥'} α = {stats.ALPHA})")
    return Check("chance", OK if learned else FLAGGED, why)


def _why_no_chance(done: list[TrialRecord]) -> tuple[str, str]:
    results = [r.result for r in done if r.result is not None]
    if not results:
        return NOT_APPLICABLE, "no finished seed"
    generation = any(r.spec.task.kind == "generation" for r in done)
    if generation or any(_recorded_era(res) for res in results):  # stored since chance existed: the task has none
        return NOT_COMPUTED, "the task has no majority-class score (not a classification task)"
    return NOT_RECORDED, "no majority-class score stored (trials stored before it was recorded)"


# -- still improving -------------------------------------------------------------------------
def still_improving(done: list[TrialRecord]) -> Check:
    seen = [r for r in done if r.result is not None and r.result.best_step is not None
            and r.result.last_eval_step is not None]
    if not seen:
        return Check("cap", NOT_APPLICABLE if not done else NOT_RECORDED,
                     "no finished seed" if not done else "no best or last validation step stored")
    hits = [r for r in seen if r.result.best_step == r.result.last_eval_step and not r.result.stopped_early]
    if not hits:
        return Check("cap", OK, f"{len(seen)} seed(s): best validation before the last pass, or stopped early")
    return Check("cap", FLAGGED, "; ".join(_improving_text(r) for r in sorted(hits, key=lambda r: r.spec.seed)))


def _improving_text(r: TrialRecord) -> str:
    res = r.result
    planned = f" of {res.planned_steps:,} planned" if res.planned_steps else ""
    return (f"seed {r.spec.seed}: best validation at step {res.best_step:,}, the last validation pass "
            f"(trained {res.steps or res.last_eval_step:,}{planned} steps, not stopped early)")


# -- search edge -----------------------------------------------------------------------------
def at_edge(finals: list[TrialRecord]) -> Check:
    chosen = [r for r in finals if r.spec.search_params]
    if not chosen:
        return Check("edge", NOT_APPLICABLE, "no search")
    found, missing, odd, names = set(), set(), set(), set()
    for r in chosen:
        for name, value in r.spec.search_params.items():
            names.add(name)
            space = r.spec.search_space.get(name)
            where = edge_of(value, space)
            if where:
                found.add(f"{name}={fmt_value(value)} is {where}")
            elif where is None:
                (missing if space is None else odd).add(name)
    if found:
        return Check("edge", FLAGGED, "; ".join(sorted(found)))
    if missing | odd == names:  # nothing could be checked
        if missing:
            return Check("edge", NOT_RECORDED, f"no declared space stored for {', '.join(sorted(missing))}")
        return Check("edge", NOT_COMPUTED, f"the space of {', '.join(sorted(odd))} is not a range or a choice list")
    return Check("edge", OK, "the selected values lie inside their ranges")


def edge_of(value, space) -> str | None:
    """Why ``value`` is at the edge of ``space`` ('' if it is not); None when the space's shape is unknown."""
    if not isinstance(space, dict):
        return None
    choices = choices_of(space)
    if choices is not None:
        if value not in choices:
            return None
        if len(choices) < 2 or not all(_number(c) for c in choices):
            return ""  # one choice, or unordered ones (names): no edge
        ordered = sorted(choices)
        if value in (ordered[0], ordered[-1]):
            return f"the {'first' if value == ordered[0] else 'last'} of {_choices(ordered)}"
        return ""
    low, high = space.get("low"), space.get("high")
    if not (_number(low) and _number(high) and _number(value)) or high <= low:
        return None
    log = bool(space.get("log"))
    if log and (low <= 0 or value <= 0):
        return None
    position = ((math.log(value) - math.log(low)) / (math.log(high) - math.log(low)) if log
                else (value - low) / (high - low))
    scale = " (log scale)" if log else ""
    if position <= EDGE:
        return f"in the lowest {EDGE:.0%} of {fmt_value(low)}..{fmt_value(high)}{scale}"
    if position >= 1 - EDGE:
        return f"in the highest {EDGE:.0%} of {fmt_value(low)}..{fmt_value(high)}{scale}"
    return ""


#: the keys a choice list is declared under (``{"choices": [8, 16, 32]}``; the search stores ``values``)
CHOICE_KEYS = ("choices", "values")


def choices_of(space) -> list | None:
    """The list of a choice space (``{"choices": [...]}`` or ``{"values": [...]}``); None for another shape."""
    if isinstance(space, dict) and len(space) == 1:
        key, found = next(iter(space.items()))
        if key in CHOICE_KEYS and isinstance(found, list):
            return found
    return None


def _choices(values: list) -> str:
    return "[" + ", ".join(fmt_value(v) for v in values) + "]"


# -- diverged --------------------------------------------------------------------------------
def diverged(finals: list[TrialRecord]) -> Check:
    seeds = sorted(r.spec.seed for r in finals if r.status == "diverged")
    if not seeds:
        return Check("diverged", OK, "no seed diverged")
    return Check("diverged", FLAGGED, f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} of "
                                      f"{len(finals)} diverged")


# -- helpers ---------------------------------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _recorded_era(result: TrialResult) -> bool:
    """Whether the trial was stored by a version that records the diagnostics' fields."""
    return bool(result.splits) or result.planned_steps is not None or result.last_eval_step is not None
