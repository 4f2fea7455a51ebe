"""The Gradient checkpointing section: peak memory and step time of a method trained with gradient
checkpointing beside the same method, config and seeds trained without it.

A suite measures both by listing a method twice, once with ``gradient_checkpointing: true`` on its entry
(or with the training section's switch on and one entry ``gradient_checkpointing: false``). Rows pair the
two runs of one method (same config, learning rate and start) in one (task, backbone, budget) group; the
figures are the costs table's (mean over finished seeds). Without such a pair the section is left out.
"""

from __future__ import annotations

import math

from peftbench.report.context import ReportContext, Section
from peftbench.report.format import decimals_for, fmt_num, fmt_spread, table
from peftbench.report.groups import Group, MethodResult
from peftbench.results.records import canonical_json

MEMORY = {"rss": "the process's peak resident set size from the start of training to the adapter's save (Linux VmHWM, "
                 "reset there, else sampled; it includes the backbone's weights and the data already loaded)",
          "cuda": "torch.cuda.max_memory_allocated from the start of training to the adapter's save"}


def checkpointed(m: MethodResult) -> bool:
    return bool(m.spec.training.gradient_checkpointing)


def _pair_key(m: MethodResult) -> str:
    s = m.spec
    return canonical_json([s.method, s.method_config, s.lr, s.init_from, s.knob_value])


def pairs(g: Group) -> list[tuple[MethodResult, MethodResult]]:
    """(without, with) gradient checkpointing: the same method, config, learning rate and start."""
    found: dict[str, dict[bool, MethodResult]] = {}
    for m in g.finished:
        found.setdefault(_pair_key(m), {})[checkpointed(m)] = m
    return [(two[False], two[True]) for two in found.values() if len(two) == 2]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def _change(off: float | None, on: float | None) -> str:
    if off is None or on is None or off == 0:
        return "—"
    return f"{100 * (on - off) / off:+.1f}%"


def added(r) -> int | None:
    """What the trial added to memory: its peak minus the memory when the measurement started."""
    if r.peak_mem_bytes is None or r.mem_start_bytes is None:
        return None
    return r.peak_mem_bytes - r.mem_start_bytes


def _figure(off: MethodResult, on: MethodResult, value, unit: str) -> list[str]:
    """Without, with (mean over seeds and range) and the change of the means."""
    values = [[v for v in map(value, m.results) if v is not None] for m in (off, on)]
    return [fmt_spread(values[0], unit), fmt_spread(values[1], unit), _change(*(_mean(v) for v in values))]


def _row(g: Group, off: MethodResult, on: MethodResult) -> list[str]:
    metric = [m.summary.mean if m.summary else None for m in (off, on)]
    decimals = decimals_for([v for v in metric if v is not None])
    return [off.spec.method, str(min(len(off.results), len(on.results))),
            *_figure(off, on, lambda r: r.peak_mem_bytes, "bytes"), *_figure(off, on, added, "bytes"),
            *_figure(off, on, lambda r: r.step_time_s, "seconds"), fmt_num(metric[0], decimals),
            fmt_num(metric[1], decimals)]


def checkpointing_sections(ctx: ReportContext) -> list[Section]:
    """One table per (task, backbone, budget) that trained some method both with and without checkpointing."""
    tables = []
    kinds: set[str] = set()
    for g in ctx.groups:
        found = pairs(g)
        if not found:
            continue
        kinds |= {r.mem_kind for off, on in found for m in (off, on) for r in m.results if r.mem_kind}
        headers = ["Method", "Seeds", "Peak memory, without", "Peak memory, with", "Change", "Added, without",
                   "Added, with", "Change", "Step time, without", "Step time, with", "Change",
                   f"Test {g.primary}, without", f"Test {g.primary}, with"]
        where = f"{g.task} on {g.backbone}" + (f", budget {g.budget}" if g.budget else "")
        tables += [f"**{where}**", "", *table(headers, [_row(g, off, on) for off, on in found],
                                              set(range(1, len(headers)))), ""]
    if not tables:
        return []
    how = "; ".join(f"{k.upper()}: {MEMORY.get(k, k)}" for k in sorted(kinds))
    intro = ("Each method trained with gradient checkpointing (every layer's activations recomputed in the backward "
             "pass instead of kept; transformers' non-reentrant checkpointing) beside the same method, config, "
             "learning rate and seeds trained without it. Peak memory: mean over seeds (min–max); "
             f"{how}. Added: the peak minus the memory when its measurement started (what training, its "
             "validation and test passes and the save added on top of the loaded model and data; — for trials "
             "stored before it was recorded). Step time: the median optimizer step, mean over seeds. Change: with "
             "against without, of the means.")
    return [Section("\n".join([intro, "", *tables]), title="Gradient checkpointing", key="gradient-checkpointing")]
