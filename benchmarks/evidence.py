"""Check published claims against a suite's final trials: the README's "What the evidence says" table.

    python benchmarks/evidence.py reports/protocol            # prints the table, writes evidence.md beside it

A row's diagnostics flagged by the report (`cap`, `chance`, `edge`, `diverged`) are printed after it.
Each claim compares two rows of one (task, backbone) group on the test primary metric, over the
final seeds (selected on validation by the suite's search). The difference A − B is in points
(metric × 100) with its 95% Welch interval (Welch–Satterthwaite degrees of freedom) and Welch's
two-sided p-value. A claim's verdict follows a rule written next to it below, decided from that
interval, never from the point estimate alone: *holds* when the whole interval satisfies the claim,
*does not hold* when the whole interval contradicts it, *inconclusive* when it straddles the line.
This script names built-in methods, so it lives under ``benchmarks/`` and not in the core.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from scipy import stats as sps

from peftbench.report import stats
from peftbench.report.diagnostics import FLAGGED
from peftbench.report.groups import build_groups
from peftbench.results.store import Store


@dataclass
class Row:
    label: str
    values: list[float]  # test primary metric over seeds, in points
    achieved: float  # % of the backbone
    lr: float | None = None  # the final seeds' learning rate (the search's selection where the suite searched)
    flags: tuple[str, ...] = ()  # the report's diagnostics flagged on this row (cap, chance, edge, diverged)


def _rows(store_dir: Path) -> dict[tuple[str, str], dict[str, Row]]:
    """(task, backbone) -> {display name: Row} over every budget group of the suite."""
    records = Store(store_dir / "results.sqlite", readonly=True).records()  # read only: no schema migration
    out: dict[tuple[str, str], dict[str, Row]] = {}
    for group in build_groups(records):
        rows = out.setdefault((group.task, group.backbone), {})
        for m in group.methods:
            values = [100 * v for v in m.values(group.primary)]
            if values:
                flags = tuple(c.code for c in m.checks if c.state == FLAGGED)
                rows.setdefault(m.spec.display, Row(m.spec.display, values, m.spec.achieved_pct, m.spec.lr, flags))
    return out


def diff(a: Row, b: Row) -> tuple[float, tuple[float, float] | None, float | None]:
    """Mean of A − B in points, its 95% Welch interval, and Welch's two-sided p."""
    d = stats.mean(a.values) - stats.mean(b.values)
    if len(a.values) < 2 or len(b.values) < 2:
        return d, None, None
    va, vb = stats.std(a.values) ** 2 / len(a.values), stats.std(b.values) ** 2 / len(b.values)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, (d, d), stats.welch(a.values, b.values)
    df = (va + vb) ** 2 / (va ** 2 / (len(a.values) - 1) + vb ** 2 / (len(b.values) - 1))
    half = sps.t.ppf(0.975, df) * se
    return d, (d - half, d + half), stats.welch(a.values, b.values)


def _verdict(interval, above: float) -> str:
    """'holds' when the interval lies above ``above``, 'does not hold' below it, else inconclusive."""
    if interval is None:
        return "inconclusive (one seed)"
    lo, hi = interval
    if lo > above:
        return "holds"
    if hi < above:
        return "does not hold"
    return "inconclusive"


def _fmt(row: Row) -> str:
    ci = stats.ci(row.values)
    spread = f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
    size = f"{row.achieved:.0f}%" if row.achieved >= 10 else f"{row.achieved:.2g}%"
    flags = f" `{', '.join(row.flags)}`" if row.flags else ""
    return f"{row.label} {stats.mean(row.values):.1f}{spread} ({size}){flags}"


def _compare(a: Row, b: Row) -> str:
    d, interval, p = diff(a, b)
    ci = f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else ""
    ptext = f", Welch p={p:.2g}" if p is not None else ""
    return f"{_fmt(a)} vs {_fmt(b)}: Δ {d:+.1f}{ci}{ptext}"


# (claim, source, A, B, verdict rule as (kind, threshold in points), rule text); A or B may be a tuple of
# display names, the first one the suite has is used
CLAIMS = [
    ("Adapters come within about 1 point of full fine-tuning at a few percent of the parameters",
     "Houlsby et al. 2019", "houlsby (reduction_factor=6)", "full", ("above", -1.0),
     "holds if the 95% interval of adapter − full lies above −1 point"),
    ("(the same claim at the matched 0.1% budget)", "Houlsby et al. 2019", "houlsby (defaults)", "full",
     ("above", -1.0), "as above"),
    ("LoRA matches full fine-tuning", "Hu et al. 2021", "lora", "full", ("above", -1.0),
     "holds if the 95% interval of LoRA − full lies above −1 point"),
    ("Prompt tuning lags far behind full fine-tuning at small model scale", "Lester et al. 2021", "full",
     "prompt", ("above", 5.0), "holds if the 95% interval of full − prompt lies above +5 points"),
    ("Deep prompts (P-tuning v2) close most of prompt tuning's gap", "Liu et al. 2022", "ptuning_v2", "prompt",
     ("gap", 0.5), "holds if P-tuning v2 − prompt's interval lies above half of full − prompt's mean gap"),
    ("Prefix tuning needs its reparameterisation (MLP) at the same budget", "Li & Liang 2021",
     ("prefix (defaults)", "prefix"), ("prefix (reparameterize=False)", "ptuning_v2"), ("above", 0.0),
     "holds if the 95% interval of prefix with MLP − without lies above 0; without the MLP is "
     "`prefix (reparameterize=False)` where the suite has that row, else `ptuning_v2`, which is the same "
     "method (bit-identical validation curves on every seed in reports/protocol)"),
    # the design notes' rules of thumb (../shared/seeds); each is checked where a suite has both rows
    ("Upper layers' adapters matter more than lower layers': the budget in the top half beats the bottom half",
     "Houlsby et al. 2019 Fig. 6; design note 002", "houlsby (layers=top:3)", "houlsby (layers=bottom:3)",
     ("above", 0.0), "holds if the 95% interval of top half − bottom half (same budget, same method) lies above 0"),
    ("(the same placement claim for LoRA)", "design note 002", "lora (layers=top:3)", "lora (layers=bottom:3)",
     ("above", 0.0), "as above"),
    ("Dynamic allocation by importance beats uniform sizes at the same budget (+2.3 GLUE points)",
     "design note 003 §5", "houlsby (allocation=importance, allocation_steps=10)", "houlsby (defaults)",
     ("above", 0.0), "holds if the 95% interval of importance − uniform allocation lies above 0"),
    ("(the same allocation claim for LoRA)", "design note 003 §5", "lora (allocation=importance, allocation_steps=10)",
     "lora (defaults)", ("above", 0.0), "as above"),
]

#: design note 003: adapters want a learning rate about 10x full fine-tuning's
LR_METHODS = ("houlsby (defaults)", "pfeiffer", "adapter_lora")
LR_BAND = (10 / math.sqrt(10), 10 * math.sqrt(10))  # within half a decade of 10x


def _names(spec: str | tuple[str, ...]) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else spec


def _pick(rows: dict[str, Row], spec: str | tuple[str, ...]) -> Row | None:
    return next((rows[n] for n in _names(spec) if n in rows), None)


def evidence(suite_dir: Path) -> str:
    groups = _rows(suite_dir)
    lines = ["| Claim | Source | Task | Our result (test accuracy, points: mean [95% CI] (size); Δ [95% Welch CI]) "
             "| Holds at this scale? |", "| --- | --- | --- | --- | --- |"]
    rules = []
    for claim, source, a_name, b_name, (kind, threshold), rule in CLAIMS:
        if not any(_pick(rows, a_name) and _pick(rows, b_name) for rows in groups.values()):
            continue  # a claim this suite was not built to check (no group has both arms)
        if rule != "as above":
            rules.append(f"- {source}: {rule}.")
        for (task, backbone), rows in sorted(groups.items()):
            a, b = _pick(rows, a_name), _pick(rows, b_name)
            if a is None or b is None:
                missing = " or ".join(_names(a_name if a is None else b_name))
                lines.append(f"| {claim} | {source} | {task} | missing: {missing} | — |")
                continue
            text = _compare(a, b)
            if kind == "gap":
                full = rows.get("full")
                gap = stats.mean(full.values) - stats.mean(b.values) if full else None
                if gap is None or gap <= 0:
                    verdict = "n/a (prompt tuning is not behind full fine-tuning)"
                else:
                    _, interval, _ = diff(a, b)
                    closed = (stats.mean(a.values) - stats.mean(b.values)) / gap
                    verdict = _verdict(interval, threshold * gap)
                    text += f"; closes {100 * closed:.0f}% of the {gap:.1f}-point gap"
            else:
                verdict = _verdict(diff(a, b)[1], threshold)
            lines.append(f"| {claim} | {source} | {task} ({backbone}) | {text} | **{verdict}** |")
    text = "\n".join(lines + ["", "Verdict rules (each decided on the 95% Welch interval of the difference):",
                              *rules, ""])
    return text + learning_rates(groups)


def learning_rates(groups) -> str:
    """Design note 003's rule that adapters want about 10x full fine-tuning's learning rate, read off the
    rates the suite's search selected on validation (empty where the suite has no full fine-tuning row)."""
    lines = []
    for (task, backbone), rows in sorted(groups.items()):
        full = rows.get("full")
        if full is None or full.lr is None:
            continue
        for name in LR_METHODS:
            row = rows.get(name)
            if row is None or row.lr is None:
                continue
            ratio = row.lr / full.lr
            verdict = "holds" if LR_BAND[0] <= ratio <= LR_BAND[1] else "does not hold"
            edge = ", ".join(f"{n} `edge`" for n, r in ((name, row), ("full", full)) if "edge" in r.flags) or "no"
            if edge != "no":  # the best rate may lie outside the range searched: the ratio is not a measurement
                verdict = "inconclusive (a selection at its range's edge)"
            lines.append(f"| {task} ({backbone}) | {name} | {row.lr:.2g} | {full.lr:.2g} | {ratio:.1f}× | {edge} "
                         f"| **{verdict}** |")
    if not lines:
        return ""
    return "\n".join([
        "", "Learning rates selected on validation (design note 003: adapters want about 10× full fine-tuning's; "
        f"holds when the ratio lies within half a decade of 10×, {LR_BAND[0]:.1f}×–{LR_BAND[1]:.0f}×; the search's "
        "resolution is its grid):", "",
        "| Task | Adapter | adapter lr | full fine-tuning lr | ratio | selected at a range's edge | 10× rule |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *lines, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite_dir", type=Path, help="a suite folder holding results.sqlite (e.g. reports/protocol)")
    args = ap.parse_args(argv)
    text = evidence(args.suite_dir)
    (args.suite_dir / "evidence.md").write_text(f"# What the evidence says: {args.suite_dir.name}\n\n"
                                                f"Written by `python benchmarks/evidence.py {args.suite_dir}`.\n\n"
                                                + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
