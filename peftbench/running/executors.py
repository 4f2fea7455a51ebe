"""Where trials run: ``local`` (this process, one at a time) or ``ray`` (one Ray task per trial).

An executor gets the pending jobs (a ``TrialSpec``, where its artifacts go and, for a search
trial, its group's study for the pruner) and two
callbacks, ``on_start(job)`` and ``on_done(job, outcome)``, and calls them on the driver:
only the driver writes the results store. ``on_start`` returns False for a job not to run
(another process has claimed it); ``on_done`` follows only the jobs that ran. Whatever runs a trial calls
``execute.execute_trial``, which never raises for the trial's own errors. The run options
are fixed when the executor is built; the Ray executor derives its workers' options once.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftbench.errors import ConfigError
from peftbench.results.records import TrialRecord, TrialResult, TrialSpec
from peftbench.running.artifacts import write_text
from peftbench.running.execute import Outcome, execute_trial
from peftbench.running.options import RunOptions
from peftbench.running.search import Pruning

RAY_INSTALL = 'pip install "peftbench[ray]"'


@dataclass(frozen=True)
class Job:
    """A trial to run, the folder or URL its artifacts go to (None: keep none) and, for a search
    trial, what its pruner needs (None: it runs to the end); ``reuse``: for a final trial, the
    selected search trial that already trained it (``running.reuse``)."""

    spec: TrialSpec
    artifacts: str | None
    pruning: Pruning | None = None
    reuse: TrialRecord | None = None

    @property
    def trial_id(self) -> str:
        return self.spec.trial_id


OnStart = Callable[[Job], bool]  # False: skip the job
OnDone = Callable[[Job, Outcome], None]


class LocalExecutor:
    """One trial at a time, in this process."""

    name = "local"

    def __init__(self, options: RunOptions, registry):
        self.options = options
        self.registry = registry

    def prepare(self, jobs: list[Job]) -> None:
        """Nothing to set up in this process."""

    def close(self) -> None:
        """Nothing held."""

    def run(self, jobs: list[Job], on_start: OnStart, on_done: OnDone) -> None:
        for job in jobs:
            if not on_start(job):
                continue
            on_done(job, execute_trial(job.spec, self.options, job.artifacts, self.registry, job.pruning, job.reuse))


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


def ray_trial(spec: TrialSpec, options: RunOptions, artifacts: str | None, dirs: tuple[str, ...] = (),
              pruning: Pruning | None = None, reuse: TrialRecord | None = None) -> Outcome:
    """The Ray task: one trial in a worker process (which may run many, one after another).

    The worker is a process of its own: it builds its registry once (installed plugins, plus
    the driver's ``--plugins-dir``) and passes it on.
    """
    from peftbench.contract.registry import get_registry

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(dirs) > 1:
        raise ConfigError(f"a run loads plugins from one --plugins-dir; this one came with {list(dirs)}")
    if dirs not in _WORKER_REGISTRY:
        _WORKER_REGISTRY[dirs] = get_registry(plugins_dir=dirs[0]) if dirs else get_registry()
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # bars from many workers would interleave in the driver's log
    datasets.disable_progress_bars()
    return execute_trial(spec, options, artifacts, _WORKER_REGISTRY[dirs], pruning, reuse)


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

    def __init__(self, options: RunOptions, registry, ray_config):
        self.run_options = options  # the driver's; the workers' are derived once in prepare()
        self.options = ray_config  # the suite's ``ray`` section: address, CPUs and GPUs per trial
        self.registry = registry
        self.ray = import_ray()
        self._started = False
        self.worker_options: RunOptions | None = None

    # -- cluster ---------------------------------------------------------------------------
    def connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        address = self.options.address
        quiet = self.run_options.quiet
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
        device = self.run_options.device
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
    def prepare(self, jobs: list[Job]) -> None:
        """Connect, check the resources, and derive the workers' run options (once)."""
        if not jobs or self.worker_options is not None:
            return
        self.connect()
        self.gpus = self._gpus()
        self._check_fits(self.gpus)
        device = self.run_options.device
        self.worker_options = self.run_options.model_copy(update=dict(  # trackers and saving as the driver's
            device="cpu" if not self.gpus and device == "auto" else device,  # no GPU reserved: keep off any GPU
            threads=self.run_options.threads or max(1, int(self.options.cpus_per_trial)),
            quiet=True,  # per-trial bars from many workers would interleave
        ))

    def run(self, jobs: list[Job], on_start: OnStart, on_done: OnDone) -> None:
        """Run ``jobs``; called once per search round and once for the final trials (``close`` ends it)."""
        ray = self.ray
        if not jobs:
            return
        self.prepare(jobs)
        self.connect()  # a no-op unless the cluster was left since prepare()
        task = ray.remote(ray_trial).options(num_cpus=self.options.cpus_per_trial, num_gpus=self.gpus,
                                             max_retries=0, name="peftbench-trial")
        dirs = tuple(plugin_dirs(self.registry))
        queue = list(jobs)
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < self._room(self.gpus):
                    job = queue.pop(0)
                    if not on_start(job):
                        continue
                    running[task.remote(job.spec, self.worker_options, job.artifacts, dirs, job.pruning,
                                         job.reuse)] = job
                if not running:  # every job left was skipped
                    break
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        outcome = self._failed(job, exc)
                    on_done(job, outcome)
        finally:
            for ref in running:  # interrupted: stop what still runs (its rows stay 'running': a rerun redoes them)
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Leave the cluster this executor joined (a local Ray it started stops)."""
        if self._started:
            self.ray.shutdown()
            self._started = False

    @staticmethod
    def _failed(job: Job, exc: BaseException) -> Outcome:
        if job.artifacts:
            try:
                write_text(job.artifacts, "error.txt", f"{type(exc).__name__}\n{exc}\n")
            except Exception:  # noqa: BLE001 - the row still records the error
                pass
        return Outcome("failed", f"ray: {_ray_error(exc)}", TrialResult(artifacts=job.artifacts) if job.artifacts else None)


#: ``--executor`` choices
EXECUTORS = ("local", "ray")


def make_executor(name: str, options: RunOptions, registry, suite):
    """The executor ``name`` for this run (``suite`` gives the Ray section)."""
    if name == "ray":
        return RayExecutor(options, registry, suite.ray)
    if name == "local":
        return LocalExecutor(options, registry)
    raise ConfigError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}")
