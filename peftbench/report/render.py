"""``report.md`` and its plots, rendered from the results store alone.

``peftbench report <suite>`` can run at any time (during a run, after a crash): every
number comes from ``results.sqlite`` and ``suite.json`` (and ``ablation.json`` when
``peftbench ablate`` ran), nothing is recomputed from models (except with ``--int8``: the INT8
sections quantise the saved weights, ``report.int8``).
The output is deterministic for a given store (a golden test pins it).

A report is sections over one context: the context is built once from the store, the
built-in sections and the plugins' sections read it, and each section is placed where it
asks to go.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.report.context import ReportContext, Section, as_sections, place, render_sections
from peftbench.report.groups import build_groups
from peftbench.report.palette import colors
from peftbench.report.plugins import place_plugin_sections
from peftbench.report.sections import BUILTIN
from peftbench.results.store import Store


def read_suite_info(suite_dir: Path) -> dict:
    """``suite.json`` (the command, the suite's hash ...), or {} when the run did not write one."""
    path = suite_dir / "suite.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def build_context(suite_dir: str | Path, store: Store, out_dir: str | Path | None = None) -> ReportContext:
    """Everything the sections read, from the store and ``suite.json``, computed once; ``out_dir``:
    where the report and its plots go (default: the suite folder)."""
    suite_dir = Path(suite_dir)
    records = store.records()
    return ReportContext(
        suite=suite_dir.name, info=read_suite_info(suite_dir), records=records, groups=build_groups(records),
        suite_dir=Path(out_dir) if out_dir is not None else suite_dir,
        colors=colors(sorted({r.spec.display for r in records})),  # one colour per method
        source_dir=suite_dir,
    )


def report_sections(context: ReportContext, store: Store, registry, int8: bool = False) -> list[Section]:
    """The built-in sections in order (with ``int8``, an INT8 section after each budget's), then each
    plugin's sections where they ask to go."""
    sections: list[Section] = []
    for _, produce in BUILTIN:
        for section in as_sections(produce(context)):
            place(sections, section)
    if int8:
        from peftbench.report.int8 import int8_section

        for g in context.groups:
            for section in int8_section(context, g, registry):
                place(sections, section)
    place_plugin_sections(sections, registry, context, store)
    return sections


def render(suite_dir: str | Path, store: Store, registry, out_dir: str | Path | None = None,
           int8: bool = False) -> str:
    """The markdown of the report; writes the plots under ``(out_dir or suite_dir) / 'plots'``.

    ``registry`` holds the plugins whose ``report_sections`` hooks add sections.
    """
    context = build_context(suite_dir, store, out_dir)
    return render_sections(report_sections(context, store, registry, int8))


def write_report(suite_dir: str | Path, store: Store, registry, out_dir: str | Path | None = None,
                 int8: bool = False) -> Path:
    """Render ``report.md`` (and ``plots/*.png``) from the store into ``out_dir`` (default: the suite
    folder, whose ``suite.json`` is read); returns its path."""
    suite_dir = Path(suite_dir)
    target = Path(out_dir) if out_dir is not None else suite_dir
    target.mkdir(parents=True, exist_ok=True)
    text = render(suite_dir, store, registry, target, int8)
    path = target / "report.md"
    tmp = path.with_suffix(f".md.{os.getpid()}.tmp")  # two processes writing at once never share one
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # readers never see half a report
    return path
