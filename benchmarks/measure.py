"""Measurements: interleaved training steps, inference latency, peak memory, checkpoint size."""

from __future__ import annotations

import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from contenders import Contender


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(c: Contender, device: torch.device) -> float:
    """Seconds for one training step: forward, loss, backward, optimiser step."""
    _sync(device)
    t0 = time.perf_counter()
    c.optimizer.zero_grad(set_to_none=True)
    c.model(**c.batch).loss.backward()
    c.optimizer.step()
    _sync(device)
    return time.perf_counter() - t0


def prepare(c: Contender, lr: float = 1e-4) -> None:
    """Train mode and a fused AdamW over everything that requires grad (the head included).

    Fused AdamW is what the runner's Trainer uses (``adamw_torch_fused``); the per-tensor
    default would add ~15 small ops per trained tensor, a cost of the optimiser, not the method.
    """
    c.model.train()
    c.optimizer = torch.optim.AdamW(c.params(), lr=lr, fused=True)


def interleaved(contenders: list[Contender], warmup: int, steps: int, device: torch.device,
                log: Callable[[str], None] = print) -> None:
    """Step i of every contender before step i + 1; the order rotates by one each round.

    Warm-up rounds are not kept. Python's garbage collector runs between rounds, not inside
    a timed step.
    """
    gc.collect()
    gc.disable()
    try:
        for round_ in range(warmup + steps):
            start = time.perf_counter()
            shift = round_ % len(contenders)
            this = {}
            for c in contenders[shift:] + contenders[:shift]:
                this[c.name] = seconds = train_step(c, device)
                if round_ >= warmup:
                    c.times.append(seconds)
            gc.collect()
            label = "warm-up" if round_ < warmup else "measured"
            slowest = ", ".join(f"{n} {t:.2f}" for n, t in sorted(this.items(), key=lambda kv: -kv[1])[:3])
            log(f"  round {round_ + 1}/{warmup + steps} ({label}): {time.perf_counter() - start:.1f} s; slowest: {slowest}")
    finally:
        gc.enable()


def rotated_calls(calls: dict[str, Callable[[], None]], reps: int, warmup: int = 10,
                  clock: Callable[[], float] = time.perf_counter,
                  before: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of every call per rep, each rep calling all of them in an order rotated by one.

    ``before`` runs ahead of each call, untimed (clearing gradients); warm-up reps are not kept.
    """
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            before()
            start = clock()
            calls[name]()
            seconds = clock() - start
            if rep >= warmup:
                times[name].append(seconds)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of a[i] / b[i] (both measured in the same round)."""
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def iqr_fraction(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    q = statistics.quantiles(times, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(times)


# -- inference -----------------------------------------------------------------------------------
@torch.no_grad()
def latency(models: dict[str, torch.nn.Module], inputs: dict, reps: int, device: torch.device) -> dict[str, list[float]]:
    """Forward seconds of each model on ``inputs``, eval mode, interleaved like the training steps."""
    for m in models.values():
        m.eval()
    names = list(models)
    out: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(reps + 1):  # round 0 warms up
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            models[name](**inputs)
            _sync(device)
            if round_:
                out[name].append(time.perf_counter() - t0)
    return out


# -- checkpoint ------------------------------------------------------------------------------------
def checkpoint_bytes(c: Contender) -> int | None:
    """Bytes on disk of what the contender saves (peftbench: ``injection.save``; peft: ``save_pretrained``)."""
    with tempfile.TemporaryDirectory() as tmp:
        if c.injection is not None:
            c.injection.save(tmp)
        elif c.kind == "peft":
            c.model.save_pretrained(tmp)
        else:
            return None
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


# -- peak memory -----------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set. Not ``ru_maxrss``: Linux carries that across fork and
    exec, so a child of a big process would report its parent's peak."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_report(c: Contender, device: torch.device, steps: int = 2) -> dict:
    """Run in a fresh process holding only ``c``: peak RSS (and CUDA peak) over a few steps."""
    loaded = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prepare(c)
    for _ in range(steps):
        train_step(c, device)
    out = {"name": c.name, "loaded": loaded, "peak": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated(device))
    return out


def peaks_in_subprocesses(script: str, argv: list[str], names: list[str], jobs: int = 2,
                          log: Callable[[str], None] = print, timeout: float = 900) -> dict[str, dict]:
    """Run ``script argv --_peak NAME`` for each name, ``jobs`` at a time; read the JSON each prints last.

    Peak RSS does not depend on timing, so these may run side by side (one torch thread each).
    """
    pending, running, out = list(names), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            log(f"  peak RSS of {name} (subprocess)")
            cmd = [sys.executable, script, *argv, "--_peak", name]
            files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
            running[name] = (subprocess.Popen(cmd, stdout=files[0], stderr=files[1], text=True), files, time.monotonic())
        for name, (proc, files, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stdout, stderr = (f.seek(0) or f.read() for f in files)
            for f in files:
                f.close()
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (stderr or stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                out[name] = {"name": name, "error": tail[0][:160]}
            else:
                out[name] = json.loads(lines[-1])
            del running[name]
        time.sleep(0.2)
    return {name: out[name] for name in names}
