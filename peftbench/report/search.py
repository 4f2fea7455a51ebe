"""The Search subsection of a (task, backbone, budget) group that ran search trials.

Per method: the space searched (as declared: a range ``{"low", "high", "log"}`` or a list
``{"choices": [...]}`` / ``{"values": [...]}``; any other shape is shown as its JSON text), how many search trials
ran and how many the pruner stopped, the values the final trials trained with (their
``search_params``) and the validation score of the search trial at those values. The
sensitivity plot draws each search trial's validation primary metric against its learning
rate. Search trials are scored on validation only; they never enter the results tables.
"""

from __future__ import annotations

from collections import Counter

from peftbench.report.context import ReportContext, Section, section_key
from peftbench.report.diagnostics import choices_of
from peftbench.report.format import NONE, decimals_for, fmt_num, fmt_value, slug, table
from peftbench.report.groups import Group
from peftbench.report.plots import sensitivity_plot
from peftbench.results.records import TrialRecord, canonical_json

ABOUT = ("Search trials are scored on validation only (never on test) and are not in the tables above. "
         "Pruned: stopped early by the pruner (its score: the best so far). Chosen: the values the final trials "
         "trained with; Validation (chosen): the search trial's score at those values.")


def search_sections(ctx: ReportContext, g: Group) -> list[Section]:
    """The group's search table and sensitivity plot (nothing when the group ran no search)."""
    if not g.searches:
        return []
    table_order = [m.method for m in [*g.finished, *g.methods]]  # the results table's order, then by name
    by_method: dict[str, list[TrialRecord]] = {}
    for r in sorted(g.searches, key=lambda r: (table_order.index(r.spec.display) if r.spec.display in table_order
                                                else len(table_order), r.spec.display, r.spec.search_index or 0,
                                                r.trial_id)):
        by_method.setdefault(r.spec.display, []).append(r)
    finals = {name: _chosen_final(g, name) for name in by_method}
    chosen = {name: final.spec.search_params if final else None for name, final in finals.items()}
    at_chosen = {name: _score_at(trials, chosen[name], g.primary) for name, trials in by_method.items()}
    decimals = decimals_for([v for trials in by_method.values() for v in _scores(trials, g.primary)])
    rows = [[name, space_text(trials), _trial_count(trials), str(sum(_pruned(r) for r in trials)),
             params_text(chosen[name]) or NONE, fmt_num(at_chosen[name], decimals)]
            for name, trials in by_method.items()]
    lines = table(["Method", "Space", "Trials", "Pruned", "Chosen", f"Validation {g.primary} (chosen)"],
                  rows, {2, 3, 5}) + ["", ABOUT, ""]
    series = {name: [(r.spec.lr, r.result.val_metrics[g.primary], _pruned(r)) for r in trials
                     if r.result is not None and _is_number(r.result.val_metrics.get(g.primary))]
              for name, trials in by_method.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if series:
        points = {name: (finals[name].spec.lr, at_chosen[name]) for name in series if at_chosen[name] is not None}
        path, link = ctx.plot(slug("sensitivity", g.task, g.backbone, g.budget or "none") + ".png")
        sensitivity_plot(series, points, ctx.colors, path, g)
        lines.append(f"![Search sensitivity to the learning rate, {g.task}, {g.backbone}, budget "
                     f"{g.budget or 'none'}]({link})")
    else:
        lines.append("No search trial recorded a validation score yet: no sensitivity plot.")
    return [Section("\n".join(lines), title="Search", level=4, key=section_key("search", g.task, g.backbone, g.budget))]


def space_text(trials: list[TrialRecord]) -> str:
    """The declared space of a method's search: 'lr ∈ [0.0001, 0.01] (log)', 'alpha ∈ {8, 16, 32}'."""
    space = next((r.spec.search_space for r in trials if r.spec.search_space), {})
    if not space:
        return "not recorded"
    return "; ".join(_dimension(name, space[name]) for name in sorted(space))


def _dimension(name: str, dim) -> str:
    choices = choices_of(dim)
    if choices is not None:
        return f"{name} ∈ {{{', '.join(fmt_value(v) for v in choices)}}}"
    if isinstance(dim, dict) and {"low", "high"} <= set(dim) <= {"low", "high", "log"}:
        return f"{name} ∈ [{fmt_value(dim['low'])}, {fmt_value(dim['high'])}]" + (" (log)" if dim.get("log") else "")
    return f"{name}: {canonical_json(dim)}"  # a shape this report does not know: shown as it was declared


def params_text(params: dict | None) -> str:
    """'lr=0.003, alpha=16' (sorted by name); '' for none."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted((params or {}).items()))


def _chosen_final(g: Group, method: str) -> TrialRecord | None:
    """The method's final trial (lowest seed) that names the values the search chose: its lr and search_params."""
    finals = [r for m in g.methods if m.method == method for r in [*m.done, *m.other] if r.spec.search_params]
    return min(finals, key=lambda r: r.spec.seed) if finals else None


def _score_at(trials: list[TrialRecord], chosen: dict | None, primary: str) -> float | None:
    """The mean validation score of the search trials that ran at the chosen values."""
    if not chosen:
        return None
    values = _scores([r for r in trials if r.spec.search_params == chosen], primary)
    return sum(values) / len(values) if values else None


def _scores(trials: list[TrialRecord], primary: str) -> list[float]:
    return [r.result.val_metrics[primary] for r in trials
            if r.result is not None and _is_number(r.result.val_metrics.get(primary))]


def _trial_count(trials: list[TrialRecord]) -> str:
    """'8', or '8 (1 failed)' when some did not finish."""
    others = Counter(r.status for r in trials if r.status != "done")
    return str(len(trials)) + (f" ({', '.join(f'{n} {s}' for s, n in sorted(others.items()))})" if others else "")


def _pruned(r: TrialRecord) -> bool:
    return r.result is not None and r.result.pruned


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
