"""A report is sections over one context.

``ReportContext`` is everything a section may read, built once per report: the suite's name
and ``suite.json``, its trial records, the (task, backbone, budget) groups with their
summaries and ranks, the formatters, the plot colours and the suite folder (for plots).
Built-in sections and plugin sections (the ``report_sections`` hook) get the same context.

A ``Section`` is a piece of markdown, optionally under a heading, that says where it goes:
at the end (the default), right after another section and that section's subsections
(``after=``), or right before one (``before=``), naming it by its key or its title. Built-in keys: ``title``, ``setup``,
``diagnostics``, ``results/<task>/<backbone>``, ``results/<task>/<backbone>/<budget or none>``,
``search/<task>/<backbone>/<budget or none>`` (inside its budget), ``pareto/<task>/<backbone>``,
``relative/<task>/<backbone>``, ``gradient-checkpointing``, ``ablation``, ``ablation/<task>/<backbone>/<budget or none>``, ``failures``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import peftbench.report.format as format_module
import peftbench.report.stats as stats_module
from peftbench.report.groups import Group, by_task_backbone
from peftbench.results.records import TrialRecord


def section_key(kind: str, *parts: str | None) -> str:
    """The key of a built-in section: ``section_key('results', task, backbone, '1%')``."""
    return "/".join([kind, *(p or "none" for p in parts)])


@dataclass(frozen=True)
class Section:
    """One part of ``report.md``: ``markdown`` under an optional heading, and where it goes.

    ``title``: the heading's text (``level`` sets its depth: 2 is ``##``); without it the
    markdown is written as it is. ``key``: a name other sections can be placed after.
    ``after``: the key or title of the section this one follows (after that section's
    subsections too); ``before``: the one it precedes; neither puts it at the end.
    """

    markdown: str = ""
    title: str | None = None
    level: int = 2
    key: str | None = None
    after: str | None = None
    before: str | None = None

    def __post_init__(self):
        if self.after is not None and self.before is not None:
            raise ValueError(f"a section goes after {self.after!r} or before {self.before!r}, not both")

    @property
    def heading(self) -> tuple[int, str | None]:
        """(depth, title): from ``title``, else from a markdown heading on the first line."""
        if self.title:
            return self.level, self.title
        first = self.markdown.lstrip("\n").split("\n", 1)[0]
        hashes = len(first) - len(first.lstrip("#"))
        if 0 < hashes <= 6 and first[hashes:hashes + 1] == " ":
            return hashes, first[hashes:].strip()
        return self.level, None

    def names(self) -> set[str]:
        """What ``after`` may call this section: its key and its title."""
        return {n for n in (self.key, self.heading[1]) if n}

    def lines(self) -> list[str]:
        """The markdown lines, each block followed by one blank line."""
        head = [f"{'#' * self.level} {self.title}", ""] if self.title else []
        body = self.markdown.rstrip()
        return head + ([body, ""] if body else [])


@dataclass(frozen=True)
class ReportContext:
    """What every section reads. ``records``: all trials of the suite; ``groups``: the final ones, grouped.

    ``fmt`` is the formatting module (``fmt.table``, ``fmt.fmt_pct``, ``fmt.fmt_bytes`` ...) and
    ``stats`` the statistics module, so a plugin's numbers read like the built-in ones.
    """

    suite: str
    info: dict[str, Any]
    records: list[TrialRecord]
    groups: list[Group]
    suite_dir: Path
    colors: dict[str, str] = field(default_factory=dict)  # method -> '#rrggbb'
    #: the suite folder the store was read from (``suite_dir`` is where the report goes; they differ with --out)
    source_dir: Path | None = None
    fmt: ModuleType = format_module
    stats: ModuleType = stats_module

    @property
    def finals(self) -> list[TrialRecord]:
        """The trials of the comparison (search trials aside)."""
        return [r for r in self.records if r.spec.role == "final"]

    @property
    def searches(self) -> list[TrialRecord]:
        """Hyper-parameter search trials (validation only, never in the tables)."""
        return [r for r in self.records if r.spec.role == "search"]

    def by_task_backbone(self) -> dict[tuple[str, str], list[Group]]:
        """The groups of each (task, backbone), budgets in order."""
        return by_task_backbone(self.groups)

    def plot(self, name: str) -> tuple[Path, str]:
        """(file to save a plot to, its link in the markdown) for a plot named ``name``."""
        return self.suite_dir / "plots" / name, f"plots/{name}"

    def section(self, markdown: str = "", **where) -> Section:
        """A ``Section`` (for plugins that import only ``peftbench``): ``title=``, ``level=``, ``key=``, ``after=``, ``before=``."""
        return Section(markdown, **where)


# -- placing sections ------------------------------------------------------------------------
class PlacementError(LookupError):
    """A section names a section to follow that the report does not have."""


def place(sections: list[Section], new: Section) -> None:
    """Put ``new`` where it asks to go: at the end, before its anchor, or after its anchor's subsections.

    Sections placed earlier at the same spot stay first, so several sections after (or
    before) one anchor keep the order they came in.
    """
    anchor_name = new.after if new.after is not None else new.before
    if anchor_name is None:
        sections.append(new)
        return
    anchor = _find(sections, anchor_name)
    if new.before is not None:
        sections.insert(anchor, new)
        return
    depth, names = sections[anchor].heading[0], sections[anchor].names()
    end = anchor + 1  # past the anchor's subsections and what was placed after it before
    while end < len(sections) and (sections[end].heading[0] > depth or sections[end].after in names):
        end += 1
    sections.insert(end, new)


def _find(sections: list[Section], name: str) -> int:
    matches = [i for i, s in enumerate(sections) if name in s.names()]
    if len(matches) != 1:
        known = sorted({n for s in sections for n in s.names()})
        why = "names no section" if not matches else f"names {len(matches)} sections (use a key)"
        raise PlacementError(f"{name!r} {why}; known: {', '.join(known)}")
    return matches[0]


def as_sections(answer) -> list[Section]:
    """A producer's answer as sections: a string, a Section, or a list of them (blank strings dropped)."""
    if answer is None:
        return []
    if isinstance(answer, (str, Section)):
        answer = [answer]
    if not isinstance(answer, (list, tuple)):
        raise TypeError(f"expected markdown, a Section or a list of them, got {type(answer).__name__}")
    out = []
    for part in answer:
        if isinstance(part, Section):
            out.append(part)
        elif isinstance(part, str):
            if part.strip():
                out.append(Section(part))
        elif part is not None:
            raise TypeError(f"expected markdown or a Section in the list, got {type(part).__name__}")
    return out


def render_sections(sections: list[Section]) -> str:
    """The markdown of the sections, in order; one trailing newline."""
    lines = [line for s in sections for line in s.lines()]
    return "\n".join(lines).rstrip() + "\n"
