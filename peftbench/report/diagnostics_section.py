"""The Diagnostics section: what each check means, every flagged row and why, what could not be checked.

The checks themselves are computed once per row when the groups are built
(``diagnostics.diagnose``); this section and the tables' Diagnostics column only read them.
A baseline joins every budget of its task and backbone, so a finding on it is listed once,
naming the budgets whose tables show it.
"""

from __future__ import annotations

from peftbench.report.context import ReportContext, Section
from peftbench.report.diagnostics import CHECKS, FLAGGED, NOT_COMPUTED, NOT_RECORDED
from peftbench.report.groups import Group, MethodResult

INTRO = ("Every row of the results tables is checked; its Diagnostics column shows the code of each check it "
         "fails, `code?` where the store lacks what a check needs, and `ok` when nothing is flagged.")


def diagnostics_section(ctx: ReportContext) -> Section:
    lines = [INTRO, ""] + [f"- `{code}`, {name}: {meaning}." for code, (name, meaning) in CHECKS.items()]
    findings = _findings(ctx.groups, {FLAGGED})
    lines += ["", "Flagged:" if findings else "Flagged: none.", ""]
    for (where, label, missing, check), budgets in findings.items():
        absent = " (not in the table: no finished seed)" if missing else ""
        lines.append(f"- {_where(where, budgets)}, **{label}**{absent} — `{check.code}` "
                     f"({CHECKS[check.code][0]}): {check.why}.")
    unchecked = _unchecked(ctx.groups)
    if unchecked:
        lines += ([""] if findings else []) + ["Not checked:", ""] + unchecked
    return Section("\n".join(lines).rstrip(), title="Diagnostics", key="diagnostics")


def _rows(groups: list[Group]) -> list[tuple[Group, MethodResult]]:
    """Every (group, method) in table order; methods with no finished seed last."""
    return [(g, m) for g in groups for m in [*g.finished, *(m for m in g.methods if not m.done)]]


def _findings(groups: list[Group], states: set[str]) -> dict[tuple, list[str]]:
    """(task and backbone, label, no finished seed, check) -> the budgets whose rows have it, in order."""
    found: dict[tuple, list[str]] = {}
    for g, m in _rows(groups):
        for check in m.checks:
            if check.state in states:
                key = ((g.task, g.backbone), m.label, not m.done, check)
                found.setdefault(key, []).append(g.budget)
    return found


def _where(task_backbone: tuple[str, str], budgets: list[str | None]) -> str:
    task, backbone = task_backbone
    named = [b for b in budgets if b]
    if not named:
        return f"{task} on {backbone}"
    return f"{task} on {backbone}, budget{'s' if len(named) > 1 else ''} {', '.join(named)}"


def _unchecked(groups: list[Group]) -> list[str]:
    """One line per (check, reason) that could not be computed: for every row, or the rows it names."""
    rows = [(g, m) for g, m in _rows(groups) if m.done]
    by_reason: dict[tuple[str, str, str], list[tuple[Group, MethodResult]]] = {}
    for g, m in rows:
        for check in m.checks:
            if check.state in (NOT_RECORDED, NOT_COMPUTED):
                by_reason.setdefault((check.code, check.state, check.why), []).append((g, m))
    lines = []
    for (code, state, why), where in by_reason.items():
        if len(where) == len(rows):
            whom = "every row"
        else:
            named: dict[tuple, list[str]] = {}
            for g, m in where:
                named.setdefault((g.task, g.backbone, g.budget), []).append(f"**{m.label}**")
            whom = "; ".join(f"{_where((t, b), [budget])}, {', '.join(labels)}"
                             for (t, b, budget), labels in named.items())
        lines.append(f"- `{code}` ({CHECKS[code][0]}) {state} for {whom}: {why}.")
    return lines

