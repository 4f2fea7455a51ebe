"""Check published claims against a suite's final trials: the README's "What the evidence says" table.

    python benchmarks/evidence.py reports/protocol            # prints the table, writes evidence.md beside it

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
from peftbench.report.groups import build_groups
from peftbench.results.store import Store


@dataclass
class Row:
    label: str
    values: list[float]  # test primary metric over seeds, in points
    achieved: float  # % of the backbone


def _rows(store_dir: Path) -> dict[tuple[str, str], dict[str, Row]]:
    """(task, backbone) -> {display name: Row} over every budget group of the suite."""
    records = Store(store_dir / "results.sqlite", create=False).records()
    out: dict[tuple[str, str], dict[str, Row]] = {}
    for group in build_groups(records):
        rows = out.setdefault((group.task, group.backbone), {})
        for m in group.methods:
            values = [100 * v for v in m.values(group.primary)]
            if values:
                rows.setdefault(m.spec.display, Row(m.spec.display, values, m.spec.achieved_pct))
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
    return f"{row.label} {stats.mean(row.values):.1f}{spread} ({size})"


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
]


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
    return "\n".join(lines + ["", "Verdict rules (each decided on the 95% Welch interval of the difference):",
                              *rules, ""])


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
