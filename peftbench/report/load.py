"""How busy the machine was while cost figures were taken, from the load each trial recorded.

Every trial stores the machine's 1-minute load average and CPU count when it started and when
it ended (``TrialResult.load_start`` / ``load_end``). Load per CPU is the load average divided by
the machine's CPUs; the trial's own threads count too, so a trial alone on the machine with one
thread per CPU reads about 1.0. Above ``THRESHOLD`` other work was competing for the CPUs: step
and train times and inference ratios measured then may be inflated (the same default run on a
loaded 2-core machine took 4–6× longer per step) and are not comparable with an idle machine's.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.report.groups import Group, MethodResult
from peftbench.results.records import TrialRecord

#: load per CPU above which a trial's cost figures are flagged: half a CPU's worth of other runnable
#: threads per CPU on top of a trial that uses them all
THRESHOLD = 1.5


@dataclass(frozen=True)
class Peak:
    """The highest load per CPU a trial recorded (at its start or its end), with what it is made of."""

    per_cpu: float
    load: float
    cpus: int
    seed: int


def trial_peak(r: TrialRecord) -> Peak | None:
    """The higher of a finished trial's start and end load per CPU; None when it recorded neither."""
    res = r.result
    samples = [s for s in ((res.load_start, res.load_end) if res is not None else ()) if s and s.per_cpu is not None]
    if not samples:
        return None
    top = max(samples, key=lambda s: s.per_cpu)
    return Peak(top.per_cpu, top.load_1min, top.cpu_count, r.spec.seed)


def method_peak(m: MethodResult) -> Peak | None:
    """The highest load per CPU over a method's finished seeds."""
    peaks = [p for p in map(trial_peak, m.done) if p is not None]
    return max(peaks, key=lambda p: p.per_cpu) if peaks else None


def recorded(g: Group) -> bool:
    """Whether some finished trial of the group recorded the machine's load."""
    return any(trial_peak(r) for m in g.finished for r in m.done)


def cell(m: MethodResult) -> str:
    """The costs table's Load/CPU cell: the method's highest load per CPU, marked when over the threshold."""
    peak = method_peak(m)
    if peak is None:
        return "—"
    return f"{peak.per_cpu:.2f}" + (" ⚠" if peak.per_cpu > THRESHOLD else "")


def warning(g: Group) -> str | None:
    """A blockquote line when some finished trial of the group ran with load per CPU above the threshold."""
    loaded = [(m, p) for m in g.finished for p in map(trial_peak, m.done) if p is not None and p.per_cpu > THRESHOLD]
    if not loaded:
        return None
    counted = sum(1 for m in g.finished for r in m.done if trial_peak(r) is not None)
    m, worst = max(loaded, key=lambda x: x[1].per_cpu)
    return (f"> ⚠ **Loaded machine:** {len(loaded)} of {counted} trials here ran with a 1-minute load average above "
            f"{THRESHOLD:g} per CPU (highest {worst.per_cpu:.2f}: load {worst.load:.2f} on {worst.cpus} CPUs, "
            f"**{m.label}** seed {worst.seed}). Their step times, train times and inference ratios may be inflated by "
            f"other work on the machine; compare them with care.")


def setup_line(records: list[TrialRecord]) -> list[str]:
    """The Setup's line on the machine's load over the finished trials (nothing when none recorded it)."""
    done = [r for r in records if r.status == "done" and r.result is not None]
    values = [s.per_cpu for r in done for s in (r.result.load_start, r.result.load_end) if s and s.per_cpu is not None]
    if not values:
        return []
    peaks = [p for p in map(trial_peak, done) if p is not None]
    over = sum(p.per_cpu > THRESHOLD for p in peaks)
    flagged = (f"; {over} of {len(peaks)} trials above {THRESHOLD:g} (warned about under their costs tables)" if over
               else f"; no trial above {THRESHOLD:g}")
    return [f"- **Machine load:** 1-minute load average per CPU at the finished trials' starts and ends: "
            f"{min(values):.2f}–{max(values):.2f} (the trial's own threads included: about 1.0 for a trial "
            f"alone using every CPU){flagged}"]
