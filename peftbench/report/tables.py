"""The two tables of each (task, backbone, budget) group: quality with its notes, and costs.

Quality: each method's size against the budget (Achieved = trainable / backbone parameters,
Δ target = (trainable − target) / target), then its primary metric over seeds as
mean ± sample standard deviation with the 95% t-interval, the other metrics, its rank and
Welch's test against the best budget-matched method (see ``stats``), and its diagnostics
(``diagnostics``: codes, explained under the table and in the Diagnostics section). Methods
that are not budget-matched follow the ranked ones with their own ranks and a mark.

The quality table also shows the majority-class score of the same test set (``TrialResult.chance``)
beside the primary metric, when the trials recorded one.

Costs: what a method costs to keep and to run, as means over finished seeds with their range
(min–max) when seeds differ, plus one column per cost figure methods declare themselves
(``TrialResult.costs``, e.g. the 4-bit weights of QLoRA), formatted by its unit; the steps each seed
trained and kept (best validation), and the machine's load while the figures were taken (``load``).
"""

from __future__ import annotations

from collections import Counter

import peftbench.report.diagnostics as diagnostics
import peftbench.report.format as fmt
import peftbench.report.load as load
import peftbench.report.stats as stats
from peftbench.report.groups import Group, MethodResult, is_apart, is_reference, off_budget


# -- quality ---------------------------------------------------------------------------------
def results_table(g: Group) -> tuple[list[str], list[str]]:
    """The quality table of one group and its notes (ranked apart, off budget, solver, baselines, unfinished,
    the diagnostics' codes)."""
    order = g.finished
    metric_names = _other_metrics(g)
    decimals = {name: fmt.decimals_for([v for m in order for v in m.values(name)])
                for name in [g.primary, *metric_names]}
    chance = any(m.values(g.primary, "chance") for m in order)  # a column only when some trial recorded it
    headers = ["Method", "Knob", "Trainable", "Achieved", "Δ target", "Head", "Seeds",
               f"{g.primary} (mean ± std)", "95% CI", *(["Majority class"] if chance else []), *metric_names, "Rank",
               "vs best (Welch)", "Diagnostics"]
    rows = [[m.label, _knob(m), fmt.fmt_params(m.spec.trainable_params), *_size_cells(m),
             fmt.fmt_params(m.spec.head_params), _seeds(m), *_primary_cells(m, decimals[g.primary]),
             *([_chance(m, g.primary, decimals[g.primary])] if chance else []),
             *(_mean_std(m.values(name), decimals[name]) for name in metric_names), *_rank_cells(m),
             diagnostics.cell(m.checks)]
            for m in order]
    right = set(range(2, len(headers) - 2))  # numbers right, the last two (text) columns left
    notes = [*_apart_notes(order), *_off_budget_notes(order), *_solver_notes(order), *_reference_notes(order),
             *_unfinished_notes(g), *([chance_note(g.primary)] if chance else []), diagnostics_legend()]
    return fmt.table(headers, rows, right), notes


def chance_note(primary: str) -> str:
    return (f"Majority class: the {primary} of always predicting train's most frequent label on the same test set "
            "(the floor a method must beat to have learned anything).")


def _chance(m: MethodResult, primary: str, decimals: int) -> str:
    """The majority-class score of the method's test set: one value, or its mean when seeds' test sets differ."""
    values = m.values(primary, "chance")
    if not values:
        return fmt.NONE
    return fmt.fmt_num(stats.mean(values), decimals) + ("" if len(set(values)) == 1 else " (mean)")


def _other_metrics(g: Group) -> list[str]:
    """Test metrics besides the primary one that some finished seed recorded as a number."""
    names = sorted({k for m in g.finished for result in m.results for k in result.metrics} - {g.primary})
    return [k for k in names if any(m.values(k) for m in g.finished)]


def _knob(m: MethodResult) -> str:
    """'r=25'; a size the user fixed says so: 'r=8 (pinned size)'."""
    return (f"{m.knob}={m.knob_value}" if m.knob else fmt.NONE) + (" (pinned size)" if m.spec.pinned else "")


def _seeds(m: MethodResult) -> str:
    """Finished seeds, and of how many when some did not finish: '2 of 3'."""
    return str(len(m.done)) + (f" of {len(m.done) + len(m.other)}" if m.other else "")


def _size_cells(m: MethodResult) -> tuple[str, str]:
    """(Achieved, Δ target); a baseline is marked not budget-solved, a method ranked apart marked so, a
    miss over one knob step flagged."""
    spec = m.spec
    achieved = fmt.fmt_pct(spec.achieved_pct if spec.base_params else None)
    if is_reference(spec):
        achieved, delta = f"{achieved} {fmt.NOT_SOLVED}", fmt.NONE
    else:
        delta = fmt.fmt_signed_pct(100 * (spec.trainable_params - spec.target_params) / spec.target_params)
    if is_apart(spec):
        achieved += f" {fmt.APART}"
    elif off_budget(m)[0]:
        achieved += f" {fmt.OFF_BUDGET}"
    return achieved, delta


def _mean_std(values: list[float], decimals: int) -> str:
    """'mean ± std' over seeds ('mean' alone for one seed, '—' for none)."""
    return _plus_minus(stats.mean(values), stats.std(values), decimals) if values else fmt.NONE


def _plus_minus(mean: float, sd: float | None, decimals: int) -> str:
    return fmt.fmt_num(mean, decimals) + (f" ± {fmt.fmt_num(sd, decimals)}" if sd is not None else "")


def _primary_cells(m: MethodResult, decimals: int) -> tuple[str, str]:
    """(mean ± std, 95% CI) of the primary metric."""
    s = m.summary
    if s is None:
        return fmt.NONE, fmt.NONE
    interval = f"[{fmt.fmt_num(s.ci[0], decimals)}, {fmt.fmt_num(s.ci[1], decimals)}]" if s.ci else fmt.NONE
    return _plus_minus(s.mean, s.std, decimals), interval


def _rank_cells(m: MethodResult) -> tuple[str, str]:
    """(Rank, vs best): 'ref' for an unranked baseline, '1 ‡' for a rank apart; the test's mark and p-value."""
    s = m.summary
    if s is None:
        return fmt.NONE, fmt.NONE
    rank = "ref" if s.rank is None else f"{s.rank} {fmt.APART}" if s.apart else str(s.rank)
    return rank, (stats.mark(s) + " " + fmt.fmt_p(s.p_vs_best)).strip()


def _off_budget_notes(order: list[MethodResult]) -> list[str]:
    notes = []
    for m in order:
        flagged, step, estimated = off_budget(m)
        if not flagged or is_apart(m.spec):
            continue
        spec = m.spec
        how = ("estimated as trainable parameters / knob value: the run recorded no step" if estimated
               else f"per step of {m.knob}")
        notes.append(
            f"{fmt.OFF_BUDGET} **{m.label}** misses the budget: {spec.trainable_params:,} trainable parameters vs "
            f"the target {spec.target_params:,} (difference {spec.trainable_params - spec.target_params:+,}), more "
            f"than one knob step ({fmt.fmt_params(round(step))} parameters, {how}). Compare it with care."
        )
    return notes


def _apart_notes(order: list[MethodResult]) -> list[str]:
    """Why each method ranked apart is not budget-matched, its size against the target, the solver's note."""
    notes = []
    for m in order:
        spec = m.spec
        if not is_apart(spec):
            continue
        why = ("pinned size outside the budget's tolerance" if spec.pinned
               else "the budget is out of its reach: trained at its nearest feasible size" if not spec.reachable
               else "not budget-matched")
        target = f"{spec.target_params:,}" + (f" ({fmt.fmt_pct(100 * spec.target_params / spec.base_params)})"
                                               if spec.base_params else "")
        solver = f" Solver: {spec.note.rstrip('.')}." if spec.note else ""
        notes.append(f"{fmt.APART} **{m.label}** is ranked apart ({why}): {spec.trainable_params:,} trainable "
                     f"parameters ({fmt.fmt_pct(spec.achieved_pct)}) vs the target {target}. Its rank is among "
                     f"the methods ranked apart only; Welch's test compares it with the best budget-matched "
                     f"method.{solver}")
    return notes


def _solver_notes(order: list[MethodResult]) -> list[str]:
    """The solver's note on a budget-matched method (a user value it replaced, a width it chose)."""
    return [f"**{m.label}**: {m.spec.note}" + ("" if m.spec.note.endswith(".") else ".")
            for m in order if m.spec.note and not is_reference(m.spec) and not is_apart(m.spec)]


def diagnostics_legend() -> str:
    """The codes of the Diagnostics column, in one line."""
    codes = ", ".join(f"`{code}` {name}" for code, (name, _) in diagnostics.CHECKS.items())
    return (f"Diagnostics: {codes}; `code?`: not recorded in this store, so not checked; `ok`: nothing flagged "
            "(details under *Diagnostics*).")


def _reference_notes(order: list[MethodResult]) -> list[str]:
    references = sorted({m.method for m in order if is_reference(m.spec)})
    if not references:
        return []
    return [f"{fmt.NOT_SOLVED} {', '.join(references)}: reference baseline(s), not budget-solved (the budget "
            "does not apply); Achieved shows what they train."]


def _unfinished_notes(g: Group) -> list[str]:
    notes = []
    for m in g.methods:
        if m.other:
            counts = Counter(r.status for r in m.other)
            what = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            where = "not in this table" if not m.done else f"{len(m.done)} seed(s) finished"
            notes.append(f"**{m.label}**: {what} ({where}; reasons under *Failed and unfinished trials*).")
    return notes


# -- costs -----------------------------------------------------------------------------------
def costs_caption(g: Group) -> str:
    """The line above a costs table: how its cells are made."""
    how = ("Costs (mean over finished seeds, (min–max) when seeds differ; Steps: trained; Kept step: the step whose "
           "weights each seed kept, at its best validation")
    if load.recorded(g):
        return how + f"; Load/CPU: the highest 1-minute load average per CPU at a seed's start or end, ⚠ above " \
                     f"{load.THRESHOLD:g}):"
    return how + "; the machine's load was not recorded for these trials):"


def costs_table(g: Group) -> list[str]:
    """Stored size, the methods' own cost figures, step time, memory, inference, training, steps, load, LR."""
    order = g.finished
    labels = cost_labels(order)
    kinds = sorted({r.mem_kind for m in order for r in m.results if r.mem_kind})
    memory = f"Peak memory ({kinds[0].upper()})" if len(kinds) == 1 else "Peak memory"
    loads = load.recorded(g)
    headers = ["Method", "Stored params", "Stored size", *labels, "Step time", memory, "Inference ×", "Train time",
               "Steps", "Kept step", *(["Load/CPU"] if loads else []), "LR"]
    rows = [[m.label, fmt.fmt_params(m.spec.stored_params), _spread(m, lambda r: r.stored_bytes, "bytes"),
             *(_spread(m, lambda r, label=label: r.costs[label].value if label in r.costs else None, unit)
               for label, unit in labels.items()),
             _spread(m, lambda r: r.step_time_s, "seconds"), _peak_memory(m, len(kinds) > 1),
             _spread(m, lambda r: r.inference_overhead, "ratio"), _spread(m, lambda r: r.train_time_s, "seconds"),
             _steps(m), kept_steps(m), *([load.cell(m)] if loads else []), f"{m.spec.lr:g}"]
            for m in order]
    return fmt.table(headers, rows, set(range(1, len(headers))))


def cost_labels(methods: list[MethodResult]) -> dict[str, str]:
    """label -> unit of every cost figure some finished seed recorded, labels sorted."""
    units: dict[str, str] = {}
    for m in methods:
        for result in m.results:
            for label, cost in result.costs.items():
                units.setdefault(label, cost.unit)
    return dict(sorted(units.items()))


def _spread(m: MethodResult, value, unit: str) -> str:
    """A figure's mean over the seeds that recorded it, with its range when they differ, in its unit's format."""
    return fmt.fmt_spread([v for v in map(value, m.results) if v is not None], unit)


def _peak_memory(m: MethodResult, kind: bool) -> str:
    """Peak memory over seeds (mean and range: the range's top is the worst run); ``kind``: name it (RSS, CUDA)
    in the cell, when the table mixes kinds."""
    text = _spread(m, lambda r: r.peak_mem_bytes, "bytes")
    kinds = sorted({r.mem_kind for r in m.results if r.mem_kind})
    return text + (f" {'/'.join(k.upper() for k in kinds)}" if kind and kinds and text != fmt.NONE else "")


def _steps(m: MethodResult) -> str:
    """Optimizer steps: one number, or the range over seeds when early stopping varied it."""
    steps = sorted({r.steps for r in m.results if r.steps is not None})
    if not steps:
        return fmt.NONE
    return f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}"


def kept_steps(m: MethodResult) -> str:
    """The step whose weights each finished seed kept: 's0 120, s1 100, s2 120'."""
    kept = [(r.spec.seed, r.result.best_step) for r in sorted(m.done, key=lambda r: r.spec.seed)
            if r.result is not None and r.result.best_step is not None]
    return ", ".join(f"s{seed} {step:,}" for seed, step in kept) or fmt.NONE
