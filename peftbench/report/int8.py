"""The INT8 section of each budget: post-training int8 quantisation of every finished trial's saved weights.

For every (task, backbone, budget) group, each finished trial whose folder holds its adapter is
measured by ``peftbench.using.int8`` (cached in the trial folder, so a second report reads it), and
one table gives, per method, the INT8 columns: the method's stored weights in int8 against fp32,
the change of the primary metric on validation (int8 minus fp32, mean ± standard deviation over
seeds) and the forward time ratio int8 / fp32. Trials without saved weights are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftbench.report.context import ReportContext, Section, section_key
from peftbench.report.format import fmt_bytes, fmt_num, table
from peftbench.report.groups import Group
from peftbench.results.records import TrialRecord
from peftbench.using.int8 import REPEATS

CAPTION = ("Post-training dynamic int8 quantisation (`torch.ao.quantization.quantize_dynamic`, qint8 weights, "
           "per-tensor scale) of every `nn.Linear` made only of the method's trained parameters; its other trained "
           "tensors (LayerNorms, prefixes) stay fp32 and count in both sizes. INT8 Δ: the primary metric on the "
           "trial's validation subsample, int8 minus fp32 (mean ± sd over seeds). INT8 time: forward time over that "
           f"subsample, int8 / fp32 (fastest of {REPEATS} passes each; below 1 is faster).")


def trial_folder(ctx: ReportContext, record: TrialRecord) -> Path | None:
    """The trial's folder when it holds a saved adapter, else None."""
    candidates = [ctx.suite_dir / "trials" / record.trial_id]
    if record.result is not None and record.result.artifacts:
        candidates.insert(0, Path(record.result.artifacts))
    for folder in candidates:
        if (folder / "adapter").is_dir():
            return folder
    return None


def int8_section(ctx: ReportContext, g: Group, registry) -> list[Section]:
    """The group's INT8 table (nothing when no finished trial saved weights)."""
    from peftbench.using.int8 import int8_figures

    rows = []
    for m in g.methods:
        figures = []
        for record in m.done:
            folder = trial_folder(ctx, record)
            if folder is None:
                continue
            print(f"INT8: {m.label or m.method} seed {record.spec.seed} ({folder.name})", file=sys.stderr, flush=True)
            figures.append(int8_figures(folder, record.spec, registry))
        measured = [f for f in figures if "skipped" not in f]
        if not measured:
            continue
        deltas = [f["delta"] for f in measured]
        spread = ctx.stats.std(deltas)
        mean = lambda key: sum(f[key] for f in measured) / len(measured)  # noqa: E731
        rows.append([m.label or m.method, str(len(measured)), str(measured[0]["quantized_linears"]),
                     fmt_bytes(mean("int8_bytes")), fmt_bytes(mean("fp32_bytes")),
                     f"{mean('int8_bytes') / mean('fp32_bytes'):.2f}",
                     fmt_num(ctx.stats.mean(deltas), 3) + (f" ± {fmt_num(spread, 3)}" if spread is not None else ""),
                     f"{mean('time_ratio'):.2f}"])
    if not rows:
        return []
    metric = g.primary
    headers = ["Method", "Seeds", "Linears", "INT8 stored", "fp32 stored", "INT8 / fp32 size",
               f"INT8 Δ {metric} (val)", "INT8 time / fp32"]
    text = "\n".join([CAPTION, "", *table(headers, rows, set(range(1, len(headers))))])
    return [Section(text, title=f"INT8 adapters, budget {g.budget or 'none'}", level=4,
                    key=section_key("int8", g.task, g.backbone, g.budget),
                    after=section_key("results", g.task, g.backbone, g.budget))]
