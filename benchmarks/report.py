"""Markdown for step_time.py: machine, command, the training-step table, inference, notes."""

from __future__ import annotations

import math
import statistics

from contenders import INPUT_PROMPTS
from measure import iqr_fraction, paired_ratio

#: issue 6's step-time targets: method -> (reference contender, limit)
STEP_TARGET = 1.02
AT_FLOOR = ("lora", "prefix", "ptuning_v2", "houlsby", "pfeiffer", "adapter_lora")
PEER_TARGET = 1.00
QLORA_TARGET = 0.30  # qlora's frozen base weights in memory, as a fraction of their fp32 bytes
#: inference targets: (phase, method) -> limit on the ratio to the plain backbone
INFERENCE_TARGET = {("merged", "lora"): 1.00, ("unmerged", "lora"): 1.02, ("unmerged", "houlsby"): 1.02,
                    ("unmerged", "pfeiffer"): 1.02, ("unmerged", "adapter_lora"): 1.02}
MiB = 1 << 20


def _x(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}×"


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: order statistics k and n - k + 1.

    k is the largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so the interval
    covers the true median with probability >= ``level`` whatever the distribution; None when
    n is too small for any (n < 6 at 95%).
    """
    n = len(values)
    tail, k = (1 - level) / 2, 0
    while k < n and sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n <= tail:
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def ratio_ci(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """95% interval of the median per-round ratio a[i] / b[i] (see ``median_ci``)."""
    return median_ci([x / y for x, y in zip(a, b)]) if a and b else None


def _ci(interval: tuple[float, float] | None) -> str:
    return "—" if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}"


def _verdict(checks: list[tuple[str, float | None, float]]) -> tuple[str, str]:
    """(target text, met text) from (label, ratio, limit) checks; a 1.00 limit is met at <= 1.005."""
    if not checks:
        return "—", "—"
    target = "; ".join(f"{label} ≤ {lim:.2f}" for label, _, lim in checks)
    parts = []
    for label, ratio, limit in checks:
        if ratio is None:
            parts.append("n/a")
        elif round(ratio, 2) <= limit:
            parts.append("yes")
        else:
            parts.append(f"no (+{100 * (ratio - limit):.1f} pts)")
    return target, " / ".join(parts)


def step_rows(built: dict, peaks: dict, checkpoints: dict) -> list[list[str]]:
    floor, full = built["floor"], built.get("full")
    rows = []
    for name, c in built.items():
        med = statistics.median(c.times)
        x_floor = paired_ratio(c.times, floor.times)
        ref = f"floor+{c.virtual_tokens}"  # input prompts: the floor at the lengthened sequence
        x_ref = paired_ratio(c.times, built[ref].times) if ref in built else None
        x_full = paired_ratio(c.times, full.times) if full is not None else None
        twin = built.get(f"peft:{name}") if c.kind == "ours" else None
        ours_peft = paired_ratio(c.times, twin.times) if twin is not None else None
        checks, cis = [], []
        if c.kind == "ours" and name in AT_FLOOR:
            checks.append(("×floor", x_floor, STEP_TARGET))
            cis.append(_ci(ratio_ci(c.times, floor.times)))
        if c.kind == "ours" and name in INPUT_PROMPTS:
            checks.append((f"×{ref}", x_ref, STEP_TARGET))
            cis.append(_ci(ratio_ci(c.times, built[ref].times)) if ref in built else "—")
        if twin is not None:
            checks.append(("ours/peft", ours_peft, PEER_TARGET))
            cis.append(_ci(ratio_ci(c.times, twin.times)))
        if c.quantized_fraction is not None:
            checks.append(("4-bit weights × fp32 bytes", c.quantized_fraction, QLORA_TARGET))
            cis.append("exact")
        target, met = _verdict(checks)
        peak = peaks.get(name, {})
        rss = "error" if "error" in peak else "—"
        if "peak" in peak:  # the process's peak, and how much of it came after loading (training)
            rss = f"{peak['peak'] / MiB:,.0f} (+{(peak['peak'] - peak['loaded']) / MiB:,.0f})"
        if "cuda_peak" in peak:
            rss += f" (cuda {peak['cuda_peak'] / MiB:,.0f})"
        ckpt = checkpoints.get(name)
        rows.append([
            f"`{name}`", c.config, f"{c.trainable:,}", f"{med:.3f}", f"{100 * iqr_fraction(c.times):.1f}%",
            _x(x_floor), _x(x_ref) if x_ref is not None else "", _x(x_full), _x(ours_peft) if twin else "",
            rss, "—" if ckpt is None else f"{ckpt / 1024:,.1f}", target, met, " / ".join(cis) or "—",
        ])
    return rows


def inference_rows(latency: dict) -> list[list[str]]:
    rows = []
    for phase, times in latency.items():
        plain = times["plain"]
        for name, t in times.items():
            if name == "plain":
                continue
            ratio = paired_ratio(t, plain)
            peer = times.get(f"peft:{name}")
            ours_peft = paired_ratio(t, peer) if peer else None
            limit = INFERENCE_TARGET.get((phase, name))
            target, met = _verdict([("×plain", ratio, limit)] if limit else [])
            ms, plain_ms = 1000 * statistics.median(t), 1000 * statistics.median(plain)
            rows.append([f"`{name}`", phase, f"{ms:.1f}", f"{plain_ms:.1f}", _x(ratio), _ci(ratio_ci(t, plain)),
                         _x(ours_peft) if peer else "", target, met])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(*, args, base, batch, built, latency, checkpoints, peaks, adapters, environment, elapsed, command) -> str:
    env = environment
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    rows_kept = batch["attention_mask"].sum(1).tolist()
    spec = base.spec
    out = [
        f"# Training-step time: `{args.backbone}`",
        "",
        f"Command: `{command}`",
        "",
        f"- machine: {env['cpu']}, {env['cpu_count']} CPUs available, torch threads {env['torch_threads']}, "
        f"device {env['device']}{', ' + env['gpu'] if 'gpu' in env else ''}; load average at the end {env['load']}",
        f"- versions: python {env['python']}, {versions}",
        f"- allocator: {env['malloc']}",
        f"- date: {env['date']}; whole run {elapsed:.0f} s",
        f"- backbone: {spec.name} ({spec.model_type}, {spec.layers} layers, d={spec.hidden}, "
        f"{spec.base_params:,} parameters without the head), task {base.task}",
        f"- batch {len(rows_kept)} × {batch['input_ids'].shape[1]}, padded like the runner pads "
        f"(tokens kept per row: {', '.join(map(str, rows_kept))}); budget {args.budget}",
        f"- {args.steps} measured steps per contender after {args.warmup} warm-up steps, round-robin "
        f"(step i of every contender before step i+1, order rotated each round); fused AdamW (the runner's "
        "Trainer default)",
        "",
        "## Training step (forward, loss, backward, optimiser step)",
        "",
        table(["contender", "config", "trainable", "median s", "IQR", "× floor", "× floor+n", "× full", "ours/peft",
               "peak RSS MiB (+ training)", "checkpoint KiB", "target", "met", "95% CI"], step_rows(built, peaks, checkpoints)),
        "",
    ]
    if latency:
        out += [
            "## Inference (forward, eval mode, no grad) vs the plain backbone",
            "",
            f"Median of {args.latency_reps} forward passes on the same batch, interleaved with the plain frozen "
            "backbone; `prefix` uses its flattened table (after `finalize()`), peft's prefix runs its MLP.",
            "",
            table(["contender", "phase", "median ms", "plain ms", "× plain", "95% CI", "ours/peft", "target", "met"],
                  inference_rows(latency)),
            "",
        ]
    if adapters:
        out += [adapters, ""]
    out += ["## Notes", ""] + notes(built, peaks)
    return "\n".join(out) + "\n"


def notes(built: dict, peaks: dict) -> list[str]:
    lines = [
        "- `floor`: the frozen backbone with one trainable scalar multiplying the embedding output, so backward "
        "walks every layer; `floor+n` is the same at the sequence lengthened by n virtual tokens (the inherent "
        "cost of prompt tuning and P-tuning). Every contender also trains the task head (peft: its "
        "`modules_to_save` copy).",
        "- Ratios (× floor, × full, ours/peft) are the median over measured rounds of the per-round ratio; "
        "IQR is the interquartile range of the step times over their median.",
        "- Targets (issue 6): LoRA, prefix, P-tuning v2, Houlsby, Pfeiffer, adapter_lora ≤ 1.02× floor; "
        "prompt tuning and P-tuning ≤ 1.02× the lengthened floor; ours/peft ≤ 1.00; qlora's 4-bit base "
        "weights ≤ 0.30× their fp32 bytes; merged LoRA inference 1.00× plain, unmerged LoRA and adapters "
        "≤ 1.02×. A 1.00 limit counts as met when the ratio rounds to 1.00.",
        "- 95% CI: a distribution-free confidence interval of the median per-round ratio of each target's "
        "check, in the same order (order statistics k and n−k+1 of the n rounds, k from the binomial "
        "distribution; 10 rounds: the 2nd and 9th of 10, 97.9% coverage). The met column judges the median; "
        "a target is settled by this run only where the whole interval lies on one side of the limit.",
        "- Peak RSS: a fresh subprocess per contender (one torch thread) builds the backbone and that "
        "contender only and takes 2 training steps (the second with AdamW's state allocated); the figure is "
        "the process's peak resident set (`VmHWM`: the Python runtime and the backbone's weights "
        "included), in brackets its rise over the resident set once the model was built. On CPU, `qlora` "
        "keeps the replaced fp32 linears (for `remove()`), so its RSS does not show the 4-bit saving; its "
        "4-bit bytes are in the note below.",
        "- Checkpoint: bytes written by `injection.save()` (ours, with the task head) or peft's "
        "`save_pretrained()` (with its `modules_to_save` head), after the timed steps.",
    ]
    for name, c in built.items():
        if c.note:
            lines.append(f"- `{name}`: {c.note}")
    for name, peak in peaks.items():
        if "error" in peak:
            lines.append(f"- peak RSS of `{name}` failed: {peak['error']}")
    return lines
