"""The report: ``report.md`` and its plots, rendered from the results store alone.

Modules, one idea each:

- ``format``: number formatting and the one markdown table renderer;
- ``stats``: statistics over seeds (mean, std, t-interval, Welch's test, a one-sided test, ranks);
- ``diagnostics``: the checks of every row (did not learn, still improving, search edge, diverged);
- ``groups``: trial records grouped by (task, backbone, budget), with summaries, ranks and checks;
- ``tables``: the quality table (and its notes) and the costs table of a group;
- ``load``: the machine's load while costs were measured, and the warning when it was high;
- ``training``: the Setup's training lines (the schedule each task and backbone ran under);
- ``palette``: one colour, marker and line style per method, no two colours alike;
- ``plots``: Pareto (with a linear panel per crowded budget), relative to full fine-tuning, learning curves,
  search sensitivity;
- ``context``: ``ReportContext`` (what every section reads) and ``Section`` (where it goes);
- ``checkpointing``: gradient checkpointing beside the same runs without it; ``ablation``: the layer-ablation
  heatmaps and table, from ``ablation.json`` (``peftbench ablate``);
- ``setup``, ``diagnostics_section``, ``search`` and ``sections``: the built-in sections; ``plugins``: the
  ``report_sections`` hook;
- ``render``: assembling ``render`` / ``write_report``; ``cli``: ``peftbench report``.
"""

from __future__ import annotations

from peftbench.report.cli import add_report_arguments, main_report
from peftbench.report.context import ReportContext, Section, section_key
from peftbench.report.diagnostics import CHECKS, Check
from peftbench.report.format import (
    APART,
    NOT_SOLVED,
    OFF_BUDGET,
    cell,
    decimals_for,
    fmt_bytes,
    fmt_cost,
    fmt_num,
    fmt_p,
    fmt_params,
    fmt_pct,
    fmt_seconds,
    fmt_short,
    fmt_value,
    sig3,
    slug,
    table,
)
from peftbench.report.groups import Group, MethodResult, build_groups, is_apart, is_reference
from peftbench.report.plots import pareto_front
from peftbench.report.plugins import plugin_sections
from peftbench.report.render import build_context, render, write_report
from peftbench.report.setup import BUDGET_DEFINITION

__all__ = [
    "APART", "BUDGET_DEFINITION", "CHECKS", "Check", "Group", "MethodResult", "NOT_SOLVED", "OFF_BUDGET",
    "ReportContext", "Section", "add_report_arguments", "build_context", "build_groups", "cell", "decimals_for",
    "fmt_bytes", "fmt_cost", "fmt_num", "fmt_p", "fmt_params", "fmt_pct", "fmt_seconds", "fmt_short", "fmt_value",
    "is_apart", "is_reference", "main_report", "pareto_front", "plugin_sections", "render", "section_key", "sig3",
    "slug", "table", "write_report",
]
