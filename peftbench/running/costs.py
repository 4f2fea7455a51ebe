"""What a trial costs besides its parameters: peak memory, inference latency, environment, machine load.

Peak memory is the process's resident set on CPU (Linux: ``VmHWM``, reset per trial through
``/proc/self/clear_refs``; elsewhere sampled with psutil) and ``torch.cuda.max_memory_allocated``
on CUDA. Inference latency is a ratio: the trained model against the plain backbone on the
same batch, a few forward passes each, interleaved so that machine noise hits both. The machine's
load (1-minute load average and CPUs) is sampled when a trial starts and ends, so that a report can
say which cost figures were taken on a busy machine.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import threading
import time
from importlib import metadata

import torch

from peftbench.results.records import MachineLoad

# glibc tuning that removes page-fault storms from CPU training steps (see the README)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_VALUE = 1 << 30


def cpu_count() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_load() -> MachineLoad:
    """The machine's 1-minute load average, its CPUs and the CPUs this process may use, now."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows; a system that does not say
        load = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    return MachineLoad(load_1min=load, cpu_count=os.cpu_count(), usable_cpus=usable)


_MALLOC_TUNED: str | None = None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS, Windows)
        return None


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds unless the user set ``MALLOC_*_THRESHOLD_`` already.

    A CPU training step otherwise frees and re-maps its large activations every step (tens
    to hundreds of thousands of page faults per step). Returns whether the setting applies.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    libc = _libc() if sys.platform == "linux" else None
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MALLOC_VALUE)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_VALUE))
    except AttributeError:
        return False
    if ok:
        _MALLOC_TUNED = f"mallopt M_MMAP_THRESHOLD={MALLOC_VALUE}, M_TRIM_THRESHOLD={2 * MALLOC_VALUE}"
    return ok


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (a previous trial's peak must not count for the next)."""
    import gc

    gc.collect()
    libc = _libc() if sys.platform == "linux" else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak memory between ``start()`` and ``stop()``: (bytes, kind) with kind 'cuda' or 'rss'."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sampler: threading.Thread | None = None
        self._peak = 0
        self._running = False
        #: the memory when ``start()`` reset the peak (CUDA: allocated; CPU: resident): the peak's floor
        self.start_bytes: int | None = None

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        release_free_memory()
        if self._reset_hwm():
            self.start_bytes = _status_kib("VmRSS") * 1024 or None
        else:
            import psutil

            self.start_bytes = psutil.Process().memory_info().rss
            self._running = True
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def stop(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda"
        if self._sampler is not None:
            self._running = False
            self._sampler.join()
            return self._peak, "rss"
        return _status_kib("VmHWM") * 1024, "rss"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (Linux >= 4.0)
            return _status_kib("VmHWM") > 0
        except OSError:
            return False

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while self._running:
            self._peak = max(self._peak, proc.memory_info().rss)
            time.sleep(0.02)


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _timed_forward(model, batch, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.no_grad()
def latency_ratio(model, plain, batch: dict, device: torch.device, repeats: int = 5) -> tuple[float, float, float]:
    """(ratio, model seconds, plain seconds): median forward time of ``model`` over ``plain``."""
    model.eval()
    plain.eval()
    _timed_forward(model, batch, device)  # warm-up: allocator, kernels, caches
    _timed_forward(plain, batch, device)
    ours, base = [], []
    for i in range(repeats):
        pair = [(model, ours), (plain, base)]
        for m, times in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
            times.append(_timed_forward(m, batch, device))
    ours_s, base_s = statistics.median(ours), statistics.median(base)
    return ours_s / base_s, ours_s, base_s


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, hardware and threads a trial ran with (stored with every row)."""
    dists = ["peftbench", "torch", "transformers", "accelerate", "datasets", "evaluate", "bitsandbytes", "safetensors"]
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: v for d in dists if (v := _version(d))},
        "cpu": _cpu_name(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "malloc": _MALLOC_TUNED or " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                                         if k in os.environ) or "glibc defaults",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["cuda"] = torch.version.cuda
        env["gpu_count"] = torch.cuda.device_count()
    return env
