"""The built-in sections, each a function of the report context, in the order they are written.

Title, Setup, Diagnostics (every flagged row and why), then for every (task, backbone): a
heading, one subsection per budget (quality table and notes, costs table, learning curves,
and the search when one ran), the Pareto plot, and (with several budgets) the plot relative
to full fine-tuning; then gradient checkpointing against the same runs without it (when a
suite ran both) and the layer ablation when ``peftbench ablate`` ran; last, the trials that did not finish. Plugin sections
are placed among these by the same machinery (``context.place``).
"""

from __future__ import annotations

from typing import Callable

import peftbench.report.stats as stats
from peftbench.report.ablation import ablation_sections
from peftbench.report.checkpointing import checkpointing_sections
from peftbench.report.context import ReportContext, Section, section_key
from peftbench.report.diagnostics_section import diagnostics_section
from peftbench.report.format import decimals_for, fmt_num, slug, table
from peftbench.report.groups import Group, MethodResult
from peftbench.report.load import warning as load_warning
from peftbench.report.plots import LOSS_SMOOTHING, clustered, curves_plot, pareto_plot, relative_plot
from peftbench.report.search import search_sections
from peftbench.report.setup import setup_section
from peftbench.report.tables import costs_caption, costs_table, results_table
from peftbench.results.records import CEILING, TrialRecord

REASON_CHARS = 300  # a failure's reason is cut to this many characters in the table
CURVES_CAPTION = (f"Per method: the mean over seeds (each step over the seeds that reached it), the band from the "
                  f"lowest to the highest seed; training loss smoothed (exponential moving average, weight "
                  f"{LOSS_SMOOTHING:g} per logged point), validation passes marked.")


def title_section(ctx: ReportContext) -> Section:
    return Section(f"Rendered by `peftbench report {ctx.suite}` from `results.sqlite` alone; rerun it to refresh.",
                   title=f"peftbench report: {ctx.suite}", level=1, key="title")


def results_sections(ctx: ReportContext) -> list[Section]:
    """Per (task, backbone): its heading, its budgets (each with its search), the Pareto plot, the relative plot."""
    out = []
    for (task, backbone), groups in ctx.by_task_backbone().items():
        out.append(Section(title=f"{task} on {backbone}", key=section_key("results", task, backbone)))
        for g in groups:
            out += [budget_section(ctx, g), *search_sections(ctx, g)]
        out += pareto_section(ctx, groups) + relative_section(ctx, groups)
    return out


def budget_section(ctx: ReportContext, g: Group) -> Section:
    """One budget: the quality table and its notes, the costs table, the learning curves."""
    title = "Without a budget"
    if g.budget:
        target = f" (target {g.target:,} trainable parameters)" if g.target else ""
        title = f"Budget {g.budget}{target}"
    where = dict(title=title, level=3, key=section_key("results", g.task, g.backbone, g.budget))
    if not any(m.done for m in g.methods):
        return Section("No finished trials yet.", **where)
    quality, notes = results_table(g)
    lines = quality + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += [costs_caption(g), ""] + costs_table(g) + [""]
    loaded = load_warning(g)
    lines += [loaded, ""] if loaded else []
    path, link = ctx.plot(slug("curves", g.task, g.backbone, g.budget or "none") + ".png")
    if curves_plot(g, ctx.colors, path):
        lines += [f"![Learning curves, {g.task}, {g.backbone}, budget {g.budget or 'none'}]({link})", "",
                  CURVES_CAPTION]
    return Section("\n".join(lines), **where)


def pareto_section(ctx: ReportContext, groups: list[Group]) -> list[Section]:
    """Trainable parameters vs the primary metric over every budget (when some method has a value)."""
    g0 = groups[0]
    if not any(m.summary for g in groups for m in g.methods):
        return []
    path, link = ctx.plot(slug("pareto", g0.task, g0.backbone) + ".png")
    pareto_plot(groups, ctx.colors, path)
    panels = (" Right of it, each budget's matched methods on a linear axis (they crowd one spot of the log axis; "
              "methods of one size side by side), the target dotted, the baselines as lines." if clustered(groups) else "")
    text = (f"![Pareto plot, {g0.task}, {g0.backbone}]({link})\n\n"
            "Error bars: standard deviation over seeds. Grey steps: the Pareto front "
            f"(no other point has fewer parameters and a better score).{panels}")
    return [Section(text, title=f"Parameters vs {g0.primary}", level=3, key=section_key("pareto", g0.task, g0.backbone))]


def is_full_fine_tuning(m: MethodResult) -> bool:
    """The method whose reference role is the ceiling: full fine-tuning, the zero of the relative plot."""
    return m.spec.reference == CEILING


def relative_section(ctx: ReportContext, groups: list[Group]) -> list[Section]:
    """Each method's metric minus full fine-tuning's mean, across budgets (only with several budgets)."""
    g0 = groups[0]
    if len([g for g in groups if g.budget]) < 2:
        return []
    where = dict(title="Relative to full fine-tuning", level=3, key=section_key("relative", g0.task, g0.backbone))
    # full fine-tuning joins every budget's group: its mean over them is its mean over seeds
    fulls = [m.summary.mean for g in groups for m in g.methods if is_full_fine_tuning(m) and m.summary]
    if not fulls:
        return [Section("Several budgets ran, but no full fine-tuning trial finished: plot omitted.", **where)]
    full_mean = stats.mean(fulls)
    path, link = ctx.plot(slug("relative", g0.task, g0.backbone) + ".png")
    relative_plot(groups, full_mean, ctx.colors, path, is_full=is_full_fine_tuning)
    text = (f"![{g0.primary} relative to full fine-tuning, {g0.task}, {g0.backbone}]({link})\n\n"
            f"{g0.primary} minus full fine-tuning's mean ({fmt_num(full_mean, decimals_for(fulls))}) "
            "across the budgets, as in Houlsby et al. (2019), Fig. 2.")
    return [Section(text, **where)]


def failures_section(ctx: ReportContext) -> Section:
    """Every trial that is not done (failed, diverged, unreachable, still running or killed) and why."""
    where = dict(title="Failed and unfinished trials", key="failures")
    bad = sorted((r for r in ctx.records if r.status != "done"), key=_failure_order)
    if not bad:
        return Section("None: every trial finished." if ctx.records else "No trials recorded yet.", **where)
    rows = [[r.spec.task.name, r.spec.backbone, r.spec.display, r.spec.budget or "—", _seed(r), r.status,
             str(r.attempts), _reason(r)] for r in bad]
    return Section("\n".join(table(["Task", "Backbone", "Method", "Budget", "Seed", "Status", "Attempts", "Reason"],
                                   rows, {4, 6})), **where)


def _failure_order(r: TrialRecord) -> tuple:
    s = r.spec
    return (s.task.name, s.backbone, s.method, s.budget or "", s.seed, s.role != "final")


def _seed(r: TrialRecord) -> str:
    return str(r.spec.seed) + (f" ({r.spec.role})" if r.spec.role != "final" else "")


def _reason(r: TrialRecord) -> str:
    reason = r.error or ""
    if r.status == "running":
        reason = "unfinished: still running, or the run was killed (rerun the same command to resume)"
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "…"


#: the built-in sections, in order: (name, producer); a producer returns a Section or a list of them
BUILTIN: list[tuple[str, Callable[[ReportContext], Section | list[Section]]]] = [
    ("title", title_section),
    ("setup", setup_section),
    ("diagnostics", diagnostics_section),
    ("results", results_sections),
    ("gradient-checkpointing", checkpointing_sections),
    ("ablation", ablation_sections),
    ("failures", failures_section),
]
