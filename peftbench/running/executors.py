"""Where trials run: ``local`` (this process, one at a time) or ``ray`` (one Ray task per trial).

An executor gets the pending trials and two callbacks, ``on_start(trial)`` and
``on_done(trial, outcome)``, and calls them on the driver: only the driver writes the
results store. Whatever runs a trial calls ``execute_trial(payload)``, which never raises
for the trial's own errors. Trial artifacts go to a local folder or to any fsspec URL
(``s3://...`` once the filesystem package, e.g. ``s3fs``, is installed).

The same module knows the process's rank under ``torchrun``/``accelerate launch``: every
rank trains, only rank 0 writes (store, suite folder, artifacts, report).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

from peftbench.errors import ConfigError

RAY_INSTALL = 'pip install "peftbench[ray]"'


# -- ranks (torchrun / accelerate launch) -----------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else torchrun's RANK/WORLD_SIZE."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_distributed(cpu: bool) -> None:
    """Start the process group the Trainer will use (accelerate's choice of backend: gloo on CPU)."""
    from accelerate import PartialState

    PartialState(cpu=cpu)


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- artifacts: a local folder or an fsspec URL ----------------------------------------------
def _protocol(location: str) -> str | None:
    """The URL scheme of ``location`` (None for a plain path; ``file://`` counts as a path)."""
    if "://" not in location:
        return None
    scheme = location.split("://", 1)[0].lower()
    return None if scheme in ("file", "local") else scheme


def is_remote(location: str | None) -> bool:
    return bool(location) and _protocol(location) is not None


def local_path(location: str) -> Path:
    """A plain or ``file://`` location as an absolute path."""
    if "://" in location:
        location = location.split("://", 1)[1]
    return Path(location).expanduser().absolute()


def check_artifacts_dir(location: str) -> str:
    """The artifacts root, checked: an absolute path, or an fsspec URL whose filesystem is installed."""
    if not is_remote(location):
        return str(local_path(location))
    import fsspec

    try:
        fsspec.get_filesystem_class(_protocol(location))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"--artifacts-dir {location}: fsspec cannot write there ({exc}); install the filesystem "
                          f"package for {_protocol(location)}:// (e.g. s3fs for s3://, gcsfs for gs://) "
                          f"or give a local folder") from None
    return location.rstrip("/")


def _fs(location: str):
    from fsspec.core import url_to_fs

    return url_to_fs(location)


def clear_artifacts(location: str) -> None:
    """Remove what a killed or failed attempt left at ``location``."""
    if is_remote(location):
        fs, path = _fs(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        directory = local_path(location)
        if directory.exists():
            shutil.rmtree(directory)


def upload(directory: Path, location: str) -> None:
    """Copy the files under ``directory`` to the URL ``location`` (same relative names)."""
    fs, root = _fs(location)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        target = f"{root.rstrip('/')}/{file.relative_to(directory).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)


def write_text(location: str, name: str, text: str) -> None:
    """Write ``location/name`` (a folder or a URL)."""
    if is_remote(location):
        fs, root = _fs(location)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
            f.write(text)
    else:
        directory = local_path(location)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


# -- one trial --------------------------------------------------------------------------------
def _run(payload: dict) -> dict:
    from peftbench.running.train import Diverged
    from peftbench.running.trial import run_trial

    try:
        return {"status": "done", "error": None, "result": run_trial(payload)}
    except Diverged as exc:
        return {"status": "diverged", "error": str(exc), "result": exc.result}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded and the grid goes on
        tb = traceback.format_exc()
        if payload.get("artifacts"):
            write_text(payload["artifacts"], "error.txt", tb)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})",
                "result": {"artifacts": payload["artifacts"]} if payload.get("artifacts") else {}}


def execute_trial(payload: dict) -> dict:
    """Run one trial, never raising for the trial's own errors: {status, error, result}.

    ``payload["artifacts"]``: a folder, or a URL; for a URL the trial writes to a temporary
    folder that is uploaded when it ends (an upload that fails fails the trial).
    """
    target = payload.get("artifacts")
    if not is_remote(target):
        return _run(payload)
    with tempfile.TemporaryDirectory(prefix="peftbench-trial-") as tmp:
        outcome = _run({**payload, "artifacts": str(Path(tmp) / "trial")})
        result = dict(outcome.get("result") or {})
        result["artifacts"] = target
        outcome["result"] = result
        try:
            if (Path(tmp) / "trial").is_dir():
                upload(Path(tmp) / "trial", target)
        except Exception as exc:  # noqa: BLE001
            if outcome["status"] == "done":
                outcome = {**outcome, "status": "failed"}
            outcome["error"] = "; ".join(filter(None, [outcome.get("error"),
                                                       f"uploading the artifacts to {target} failed: "
                                                       f"{type(exc).__name__}: {exc}"]))
    return outcome


# -- executors --------------------------------------------------------------------------------
OnStart = Callable[[object], None]
OnDone = Callable[[object, dict], None]


class LocalExecutor:
    """One trial at a time, in this process."""

    name = "local"

    def __init__(self, suite=None):
        self.suite = suite

    def prepare(self, trials: list) -> None:
        """Adjust the payloads before they run (nothing to do here)."""

    def close(self) -> None:
        """Release what the executor holds (nothing here)."""

    def run(self, trials: list, on_start: OnStart, on_done: OnDone) -> None:
        for trial in trials:
            on_start(trial)
            on_done(trial, execute_trial(trial.payload))


def import_ray():
    """Ray, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"--executor ray needs Ray, which is not installed here ({exc}); install it with "
                          f"{RAY_INSTALL}, or use --executor local") from None
    return ray


def plugin_dirs(registry) -> list[str]:
    """The --plugins-dir folders ``registry`` loaded modules from (a Ray worker loads them too)."""
    dirs = []
    for name, module in registry.pm.list_name_plugin():
        file = getattr(module, "__file__", None)
        if module is not None and getattr(module, "__name__", "").startswith("peftbench_dir_plugin_") and file:
            folder = str(Path(file).resolve().parent)
            if folder not in dirs:
                dirs.append(folder)
    return dirs


_WORKER_REGISTRY: dict[tuple, object] = {}


def ray_trial(payload: dict, dirs: tuple[str, ...] = ()) -> dict:
    """The Ray task: one trial in a worker process (which may run many, one after another)."""
    from peftbench.contract.registry import get_registry, set_registry

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dirs:
        if len(dirs) > 1:
            raise ConfigError(f"a run loads plugins from one --plugins-dir; this one came with {list(dirs)}")
        if dirs not in _WORKER_REGISTRY:
            _WORKER_REGISTRY[dirs] = get_registry(plugins_dir=dirs[0])
        set_registry(_WORKER_REGISTRY[dirs])
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # bars from many workers would interleave in the driver's log
    datasets.disable_progress_bars()
    return execute_trial(payload)


def _ray_error(exc: BaseException) -> str:
    """Ray's error in one line: the task's own exception, or what happened to the worker."""
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, type(exc)):
        return f"{type(exc).__name__} ({type(cause).__name__}: {cause})".replace("\n", " ")
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no details'}"


class RayExecutor:
    """Each trial is a Ray task reserving ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs.

    Joins ``address`` (``auto``: the cluster ``ray start`` made on this machine; ``ray://``:
    Ray Client) or, without one, starts a local Ray that ends with the run. Trials are
    submitted while the cluster has room for them, so ``running`` rows are running.
    """

    name = "ray"

    def __init__(self, suite, registry=None):
        self.suite = suite
        self.options = suite.ray
        self.registry = registry
        self.ray = import_ray()
        self._started = False

    # -- cluster ---------------------------------------------------------------------------
    def connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        address = self.options.address
        quiet = bool(getattr(self, "quiet", False))
        kwargs = dict(include_dashboard=False, log_to_driver=not quiet, configure_logging=True,
                      logging_level="ERROR" if quiet else "INFO")
        try:
            if address is None:
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"--ray-address {address}: cannot reach a Ray cluster ({exc}); start one with "
                              f"`ray start --head` or leave --ray-address out for a local Ray") from None
        self._started = True

    def _gpus(self) -> float:
        """GPUs per trial: the option, else 1 when the cluster has GPUs and the device may use them."""
        device = self.suite.training.device
        gpus = self.options.gpus_per_trial
        if gpus is None:
            have = self.ray.cluster_resources().get("GPU", 0)
            gpus = 1.0 if have and device != "cpu" and device != "mps" else 0.0
        if gpus and device in ("cpu", "mps"):
            raise ConfigError(f"--gpus-per-trial {gpus:g} with --device {device}: the trials would not use the GPUs; "
                              f"use --device auto or cuda, or leave --gpus-per-trial out")
        if not gpus and device.startswith("cuda"):
            raise ConfigError(f"--device {device} with --executor ray needs GPUs: give --gpus-per-trial 1 "
                              f"(Ray then assigns each trial its GPU)")
        return float(gpus)

    def _room(self, gpus: float) -> int:
        """Trials the cluster can run at once now (at least 1: an autoscaler may add nodes)."""
        total = self.ray.cluster_resources()
        fits = [total.get("CPU", 0) / self.options.cpus_per_trial]
        if gpus:
            fits.append(total.get("GPU", 0) / gpus)
        return max(1, math.floor(min(fits) + 1e-9))

    def _check_fits(self, gpus: float) -> None:
        total = self.ray.cluster_resources()
        short = []
        if total.get("CPU", 0) < self.options.cpus_per_trial:
            short.append(f"{self.options.cpus_per_trial:g} CPUs (the cluster has {total.get('CPU', 0):g})")
        if gpus and total.get("GPU", 0) < gpus:
            short.append(f"{gpus:g} GPUs (the cluster has {total.get('GPU', 0):g})")
        if short:
            message = f"one trial asks for {' and '.join(short)}; lower --cpus-per-trial/--gpus-per-trial"
            if self._started and self.options.address is None:
                raise ConfigError(f"the local Ray started for this run cannot place a trial: {message}")
            print(f"peftbench: warning: {message}, or the trials wait for the cluster to grow", file=sys.stderr)

    # -- running ---------------------------------------------------------------------------
    def prepare(self, trials: list) -> None:
        """Connect, check the resources, and fix each payload's device and threads for its worker."""
        if not trials:
            return
        self.connect()
        self.gpus = self._gpus()
        self._check_fits(self.gpus)
        threads = self.suite.training.threads or max(1, int(self.options.cpus_per_trial))
        for trial in trials:
            training = dict(trial.payload["training"])
            if not self.gpus and training.get("device") == "auto":
                training["device"] = "cpu"  # no GPU reserved: keep off any GPU the worker may see
            training["threads"] = threads
            trial.payload["training"] = training
            trial.payload["quiet"] = True  # per-trial bars from many workers would interleave

    def run(self, trials: list, on_start: OnStart, on_done: OnDone) -> None:
        ray = self.ray
        if not trials:
            self.close()
            return
        if not hasattr(self, "gpus"):
            self.prepare(trials)
        task = ray.remote(ray_trial).options(num_cpus=self.options.cpus_per_trial, num_gpus=self.gpus,
                                             max_retries=0, name="peftbench-trial")
        dirs = tuple(plugin_dirs(self.registry)) if self.registry is not None else ()
        queue = list(trials)
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < self._room(self.gpus):
                    trial = queue.pop(0)
                    on_start(trial)
                    running[task.remote(trial.payload, dirs)] = trial
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    trial = running.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        outcome = self._failed(trial, exc)
                    on_done(trial, outcome)
        finally:
            for ref in running:  # interrupted: stop what still runs (its rows stay 'running': a rerun redoes them)
                ray.cancel(ref, force=True)
            self.close()

    def close(self) -> None:
        """Leave the cluster this executor joined (a local Ray it started stops)."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    @staticmethod
    def _failed(trial, exc: BaseException) -> dict:
        location = trial.payload.get("artifacts")
        if location:
            try:
                write_text(location, "error.txt", f"{type(exc).__name__}\n{exc}\n")
            except Exception:  # noqa: BLE001 - the row still records the error
                pass
        return {"status": "failed", "error": f"ray: {_ray_error(exc)}",
                "result": {"artifacts": location} if location else {}}


#: ``--executor`` choices: each takes the suite (and the registry) and has ``prepare`` and ``run``
EXECUTORS: dict[str, Callable[..., object]] = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str, suite, registry=None):
    if name == "ray":
        return RayExecutor(suite, registry)
    if name not in EXECUTORS:
        raise ConfigError(f"executor {name!r} is not one of {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name](suite)
