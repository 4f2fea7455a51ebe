"""Experiment trackers: each trial logs to TensorBoard, MLflow or Weights & Biases through
transformers' own ``report_to``.

The choice (``--report-to``, YAML ``training.report_to``) is a run option: it never changes a
trial's id or the suite's hash. Every trial is a run of its own, named after the trial
(``run_name``); the Trainer's callbacks log the losses and the validation metrics, and a final
trial adds its test metrics (``log_test``):

- ``tensorboard``: event files in ``<trial folder>/tensorboard/<run name>`` (transformers reads
  ``TENSORBOARD_LOGGING_DIR``), so ``tensorboard --logdir <suite>/trials`` shows every trial.
- ``mlflow``: experiment = the suite's name, one run per trial with its id, task, backbone, method,
  budget, seed and role as tags; runs go to ``MLFLOW_TRACKING_URI`` when it is set, else to the
  file store ``<suite>/mlruns`` (resolved once by the driver: ``tracker_options``).
- ``wandb``: project = the suite's name unless ``WANDB_PROJECT`` is set, files under the suite folder
  unless ``WANDB_DIR`` is; online or offline as wandb's own settings say (``WANDB_MODE=offline``).

Only rank 0 of a ``torchrun`` run logs (the other ranks train with ``report_to="none"``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from peftbench.errors import ConfigError, did_you_mean

#: tracker -> (the module transformers imports, the pip package that installs it)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
    "wandb": (("wandb",), "wandb"),
}
NONE = "none"
ALLOWED = (*TRACKERS, NONE)
#: MLflow 3 refuses its file store unless this is true; peftbench's offline store is one, so a trial sets it
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


def parse_report_to(value) -> list[str]:
    """``"tensorboard,mlflow"``, a list of names, ``none`` or None -> the trackers, in order, once each."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a tracker is a name, got {item!r}; allowed: {', '.join(ALLOWED)}")
        names += [n.strip() for n in item.split(",") if n.strip()]
    for name in names:
        if name not in ALLOWED:
            raise ValueError(f"{name!r} is not a tracker{did_you_mean(name, ALLOWED)}; allowed: {', '.join(ALLOWED)}")
    if NONE in names and len(set(names)) > 1:
        raise ValueError(f"'none' cannot be combined with trackers (got {', '.join(names)})")
    return [n for i, n in enumerate(names) if n != NONE and n not in names[:i]]


def check_installed(names) -> None:
    """A one-line error naming the pip package of a chosen tracker that is not installed."""
    for name in names:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"--report-to {name} needs the {package!r} package, which is not installed here; "
                              f"install it with `pip install {package}`, or drop {name} from --report-to")


def tracker_options(report_to, suite_dir: Path) -> dict:
    """What the trials' trackers need, resolved once by the driver (a Ray worker has neither its
    working folder nor, maybe, its environment): the trackers, the suite folder, MLflow's store."""
    suite_dir = Path(suite_dir).absolute()
    uri = None
    if "mlflow" in report_to:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (suite_dir / "mlruns").as_uri()
    return {"report_to": tuple(report_to), "tracker_dir": str(suite_dir), "mlflow_uri": uri}


def _is_file_store(uri: str | None) -> bool:
    if not uri:
        return False
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")  # C:\... on Windows


class _Env:
    """Environment variables set for a while (``only_unset``: unless the user set them), then restored
    exactly, with those named in ``restore`` (which a library may change meanwhile)."""

    def __init__(self, values: dict[str, str], only_unset=(), restore=()):
        self.values = {k: v for k, v in values.items() if k not in only_unset or k not in os.environ}
        self.keys = (*self.values, *restore)
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.keys}
        os.environ.update(self.values)
        return self

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _mlflow_experiment(client, name: str) -> str:
    """The id of the experiment ``name`` (created when missing; another process may create it at once)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except Exception:  # noqa: BLE001 - a concurrent trial created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ConfigError(f"MLflow experiment {name!r} at {client.tracking_uri} is deleted; restore it or "
                          f"delete it for good (mlflow gc), or give the suite another name with --suite")
    return experiment.experiment_id


def prepare(options, suite_name: str) -> None:
    """The driver, before any trial: MLflow's store opens and holds the suite's experiment (a one-line
    error now rather than a failure in every trial)."""
    if "mlflow" not in options.report_to:
        return
    from mlflow import MlflowClient

    with _Env({ALLOW_FILE_STORE: "true"} if _is_file_store(options.mlflow_uri) else {}, only_unset=(ALLOW_FILE_STORE,)):
        try:
            _mlflow_experiment(MlflowClient(tracking_uri=options.mlflow_uri), suite_name)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the store says, in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--report-to mlflow: the tracking store {options.mlflow_uri} cannot be used "
                              f"({first}); set MLFLOW_TRACKING_URI to a reachable store or unset it "
                              f"(then runs go to <suite>/mlruns)") from None


def run_name(spec) -> str:
    """The trial's run: its label, with its variant and search index when it has them."""
    name = spec.label
    if spec.variant:
        name += f" [{spec.variant}]"
    if spec.search_index is not None:
        name += f" #{spec.search_index}"
    return name


def folder_name(name: str) -> str:
    """A run name as a folder name (``5%`` -> ``5pct``, other characters but ``. _ + -`` -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name.replace("%", "pct")).strip("_")[:120] or "run"


def _tags(spec) -> dict[str, str]:
    tags = {"trial_id": spec.trial_id, "suite": spec.suite, "task": spec.task.name, "backbone": spec.backbone,
            "method": spec.method, "budget": spec.budget or "none", "seed": spec.seed, "role": spec.role,
            "variant": spec.variant, "search_index": spec.search_index}
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def _params(spec) -> dict[str, str]:
    """The trial's own settings (prefixed, so that they never clash with the Trainer's parameters)."""
    params = {"peftbench.lr": spec.lr, "peftbench.trainable_params": spec.trainable_params,
              **{f"peftbench.method.{k}": v for k, v in spec.method_config.items()},
              **{f"peftbench.search.{k}": v for k, v in spec.search_params.items()}}
    return {k: str(v)[:500] for k, v in params.items()}


def _metric_key(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)


class TrialTracking:
    """One trial's runs: ``with TrialTracking(spec, options, folder) as tracking: train(...,
    report_to=tracking.report_to, run_name=tracking.run_name)``; ``log_test`` adds test metrics.

    Entering sets what transformers' callbacks read (the TensorBoard folder, wandb's project) and
    starts the MLflow run, so the callback logs into it; leaving ends the runs (FAILED when the
    trial raised) and restores the environment and MLflow's tracking URI.
    """

    def __init__(self, spec, options, folder: Path | None):
        from peftbench.running.distributed import rank_and_world

        names = list(options.report_to) if rank_and_world()[0] == 0 else []
        if folder is None and "tensorboard" in names:  # nowhere to keep the events (a rank > 0, a library call)
            names.remove("tensorboard")
        self.names, self.spec, self.options = names, spec, options
        self.run_name = run_name(spec)
        self.tensorboard_dir = Path(folder) / "tensorboard" / folder_name(self.run_name) if "tensorboard" in names \
            else None
        self._env: _Env | None = None
        self._mlflow_started = False
        self._mlflow_before: str | None = None  # the process's global tracking URI before the trial (None: unset)

    @property
    def report_to(self) -> list[str] | str:
        """What ``TrainingArguments(report_to=...)`` gets."""
        return list(self.names) or NONE

    def __enter__(self) -> "TrialTracking":
        env, only_unset = {}, []
        if self.tensorboard_dir is not None:
            env["TENSORBOARD_LOGGING_DIR"] = str(self.tensorboard_dir)
        if "wandb" in self.names:
            env.update(WANDB_PROJECT=self.spec.suite, WANDB_DIR=self.options.tracker_dir or os.getcwd())
            only_unset += ["WANDB_PROJECT", "WANDB_DIR"]
        if "mlflow" in self.names and _is_file_store(self.options.mlflow_uri):
            env[ALLOW_FILE_STORE] = "true"
            only_unset.append(ALLOW_FILE_STORE)
        # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI: restored on leaving, so the next suite's default holds
        self._env = _Env(env, only_unset=only_unset, restore=("MLFLOW_TRACKING_URI",))
        self._env.__enter__()
        try:
            if "mlflow" in self.names:
                self._start_mlflow()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _start_mlflow(self) -> None:
        import mlflow

        user_env = os.environ.pop("MLFLOW_TRACKING_URI", None)  # set apart: is_tracking_uri_set then tells of the global
        self._mlflow_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        if user_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = user_env
        self._mlflow_started = True
        mlflow.set_tracking_uri(self.options.mlflow_uri)  # the Trainer's callback logs to the active run, there
        experiment = _mlflow_experiment(mlflow.MlflowClient(), self.spec.suite)
        mlflow.start_run(experiment_id=experiment, run_name=self.run_name, tags=_tags(self.spec),
                         nested=mlflow.active_run() is not None)
        mlflow.log_params(_params(self.spec))

    def tag(self, **tags) -> None:
        """More tags on the MLflow run (a reused final trial names its search trial)."""
        if "mlflow" in self.names:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_test(self, metrics: dict, step: int | None) -> None:
        """A final trial's test metrics: ``test/<name>`` in TensorBoard, ``test_<name>`` in MLflow, the wandb summary."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if not numbers:
            return
        step = step or 0
        if self.tensorboard_dir is not None:
            writer = _summary_writer(self.tensorboard_dir)
            for key, value in numbers.items():
                writer.add_scalar(f"test/{key}", value, step)
            writer.close()
        if "mlflow" in self.names:
            import mlflow

            mlflow.log_metrics({_metric_key(f"test_{k}"): v for k, v in numbers.items()}, step=step)
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update({f"test/{k}": v for k, v in numbers.items()})

    def log_curves(self, points, primary: str) -> None:
        """MLflow: a reused final trial's loss and validation curves (its search trial's; TensorBoard has the events)."""
        if "mlflow" not in self.names:
            return
        import mlflow

        for p in points:
            values = {k: v for k, v in (("loss", p.loss), (f"eval_{primary}", p.val_metric)) if v is not None}
            if values:
                mlflow.log_metrics({_metric_key(k): v for k, v in values.items()}, step=p.step)

    def adopt_events(self, search_spec) -> None:
        """A reused final trial: the search trial's copied event folder becomes this trial's run."""
        if self.tensorboard_dir is None:
            return
        source = self.tensorboard_dir.parent / folder_name(run_name(search_spec))
        if source.is_dir() and not self.tensorboard_dir.exists():
            source.rename(self.tensorboard_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._mlflow_started:
                import mlflow

                try:
                    if mlflow.active_run() is not None:  # (set_tag without one would start one)
                        if exc is not None:
                            mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:4000])
                        mlflow.flush_async_logging()  # the callback logs asynchronously
                        mlflow.end_run("FAILED" if exc is not None else "FINISHED")
                finally:  # the process's own setting back (None: none; the environment is restored below)
                    mlflow.set_tracking_uri(self._mlflow_before)
            if "wandb" in self.names:
                import wandb

                if wandb.run is not None:  # the next trial starts a run of its own
                    wandb.finish(exit_code=1 if exc is not None else 0)
        finally:
            if self._env is not None:
                self._env.__exit__(None, None, None)


def _summary_writer(logdir: Path):
    """TensorBoard's writer, as transformers picks it (torch's, else tensorboardX)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=str(logdir))
