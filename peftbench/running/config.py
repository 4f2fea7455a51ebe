"""Suite configuration: what ``peftbench run`` trains, validated by pydantic.

A suite is YAML (``configs/*.yaml``; ``include:`` other files, relative to the including
file, merged with later values winning) overridden by command-line flags. Unknown keys are
errors that name the field path and the file. The defaults are the embedded comparison:
``minilm`` on ``movie_sentiment``, every method that declares ``in_default_grid`` (the
built-in PEFT methods plus full fine-tuning and the head alone), a 0.1% budget, 3 seeds, and a
training length that finishes on 2 CPU cores in 15 minutes.

The suite's identity (``SuiteConfig.identity``/``hash``) leaves out where and how it runs
(device, threads, executor, output folders): those are run options, never trial identity.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from peftbench.budget import parse_budget
from peftbench.contract.method import format_validation_error
from peftbench.errors import BudgetError, ConfigError
from peftbench.results.records import ADDED_TRAINING_FIELDS, REFERENCE_ROLES, TrainingSpec, canonical_json
from peftbench.running.search import SearchConfig
from peftbench.running.trackers import parse_report_to
from peftbench.tasks.entry import TaskEntry

DEFAULT_TASK = "movie_sentiment"
DEFAULT_BACKBONE = "minilm"
DEFAULT_BUDGET = "0.1%"
DEFAULT_SEEDS = 3
#: a suite name names a folder (file systems allow 255 bytes; trial folders and files go below it)
MAX_SUITE_NAME = 100
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InitFrom(_Strict):
    """Two-stage training: a trial starts from a trained adapter instead of the method's initialisation.

    ``path`` is what ``peftbench.load`` takes: a suite folder (the trial is chosen by ``method``,
    ``budget``, ``seed``, ``task``, ``backbone``, ``variant``; unset ``method``, ``budget`` and ``seed``
    are the starting trial's own, so seed 2 starts from the source's seed 2), a trial folder or an
    adapter folder. The source must be the same method at the same config (size) on the same base
    weights: the budget and its verification are the trial's own. ``head``: also start from the
    source's task head (the same number of labels; label i is taken to mean label i)."""

    path: str
    method: str | None = None
    budget: str | None = None
    seed: int | None = None
    task: str | None = None
    backbone: str | None = None
    variant: str | None = None
    head: bool = False

    @model_validator(mode="before")
    @classmethod
    def _path(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @property
    def short(self) -> str:
        """How a variant names it: the source folder's name (and its method, when another is named)."""
        name = Path(self.path.rstrip("/")).name or self.path
        return name + (f"/{self.method}" if self.method else "") + (" +head" if self.head else "")


class MethodEntry(_Strict):
    """A method with config overrides and its own learning rate: ``{name: lora, config: {alpha: 16}, lr: 5e-4}``;
    ``init_from`` starts its trials from a trained adapter (``InitFrom``); ``gradient_checkpointing`` overrides
    the training section's for this entry."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0)
    init_from: InitFrom | None = None
    gradient_checkpointing: bool | None = Field(
        None, description="this entry's trials train with (true) or without (false) gradient checkpointing, whatever "
                          "the training section says: list a method twice to measure both in one suite")


class TrainingConfig(TrainingSpec):
    """The ``training:`` section: a ``TrainingSpec`` (what a trial computes) plus the learning rates
    per method and the run options (device, threads, saving weights, trackers), which are not trial identity.

    ``lr`` maps a method to its learning rate; a method not listed uses its declared
    ``schedule_lr`` (tuned for the default schedule), else its ``default_lr``.
    """

    model_config = ConfigDict(extra="forbid", frozen=False)

    lr: dict[str, float] = Field(default_factory=dict)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: the CPUs this process may use)")
    save_weights: bool = Field(True, description="save each trial's adapter weights (safetensors) in its folder")
    report_to: list[str] = Field(default_factory=list, description="trackers each trial logs to through transformers' "
                                 "report_to: tensorboard, mlflow, wandb (none: [])")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value):
        return parse_report_to(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("lr")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, lr in value.items():
            if not lr > 0:
                raise ValueError(f"learning rate of {name!r} must be > 0 (got {lr})")
        return value

    def spec(self) -> TrainingSpec:
        """The part of this section that is trial identity."""
        return TrainingSpec(**self.model_dump(include=set(TrainingSpec.model_fields)))


#: training options that change how a trial runs, not what it computes (never in ids and hashes)
RUN_ONLY = tuple(sorted(set(TrainingConfig.model_fields) - set(TrainingSpec.model_fields) - {"lr"}))


_RAY_ADDRESS = re.compile(r"^(auto|ray://[^\s/:]+:\d+|[^\s/:]+:\d+)$")


class RayConfig(_Strict):
    """``executor: ray``: the cluster to join and what one trial reserves there."""

    address: str | None = Field(None, description="auto (a running cluster), ray://HOST:PORT, HOST:PORT; "
                                                   "null: start a local Ray")
    gpus_per_trial: float | None = Field(None, ge=0, description="GPUs one trial reserves (fractions share a GPU); "
                                                                  "null: 1 where the cluster has GPUs and the device allows, else 0")
    cpus_per_trial: float = Field(1, gt=0, description="CPUs one trial reserves (also its torch threads)")

    @field_validator("address")
    @classmethod
    def _address(cls, value):
        if value is not None and not _RAY_ADDRESS.match(value):
            raise ValueError(f"Ray address {value!r} is not one of auto, ray://HOST:PORT, HOST:PORT")
        return value


class SuiteConfig(_Strict):
    """A grid: tasks x backbones x methods x budgets x seeds, plus how each trial trains."""

    suite: str | None = Field(None, description="name of the suite folder under out (default: derived from the grid)")
    out: str = "reports"
    tasks: list[TaskEntry] = Field(default_factory=lambda: [TaskEntry(name=DEFAULT_TASK)], min_length=1)
    backbones: list[str] = Field(default_factory=lambda: [DEFAULT_BACKBONE], min_length=1)
    #: null: every method that declares ``in_default_grid``
    methods: list[MethodEntry] | None = None
    budgets: list[str] = Field(default_factory=lambda: [DEFAULT_BUDGET], min_length=1)
    seeds: int | list[int] = DEFAULT_SEEDS
    executor: Literal["local", "ray"] = Field("local", description="where trials run: local (in this process) or ray")
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    artifacts_dir: str | None = Field(None, description="trial artifacts: a folder or an fsspec URL (default: OUT/SUITE/trials)")
    preset: str | None = Field(None, description="a named schedule the training section starts from (converged)")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    search: SearchConfig | None = Field(None, description="equal-effort search per group before the final seeds "
                                                          "(running.search); null or 0 trials: none")
    init_from: InitFrom | None = Field(None, description="two-stage training for every method entry without its own "
                                                         "init_from: each starts from its own method's adapter there")
    #: set by ``plan.finish_suite`` once names are canonical and learning rates resolved (done once per suite)
    _finished: bool = PrivateAttr(False)
    #: what ``finish_suite`` changed that the user should hear about (repeats dropped)
    _notes: list = PrivateAttr(default_factory=list)

    @field_validator("tasks", "methods", mode="before")
    @classmethod
    def _names(cls, value):
        """``[lora, {name: houlsby, lr: 1e-3}]``: a bare name is an entry with that name."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, value):
        items = [value] if isinstance(value, (str, int, float)) else value
        out = []
        for item in items:
            try:
                out.append(parse_budget(item).text)
            except BudgetError as exc:
                raise ValueError(str(exc)) from None
        return out

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("seeds must be a count >= 1 or a list of seeds")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("the list of seeds must be non-empty and without repeats")
        return value

    @field_validator("suite")
    @classmethod
    def _suite_name(cls, value):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
            raise ValueError(f"suite name {value!r} must be a folder name (letters, digits, . _ + -)")
        if value is not None and len(value) > MAX_SUITE_NAME:
            raise ValueError(f"suite name is {len(value)} characters long ({value[:20]}...); at most "
                             f"{MAX_SUITE_NAME} allowed (it names a folder)")
        return value

    @model_validator(mode="after")
    def _unique(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks repeat a name: {names}")
        if len(set(self.backbones)) != len(self.backbones):
            raise ValueError(f"backbones repeat a name: {self.backbones}")
        return self

    # -- views ---------------------------------------------------------------------------
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def method_entries(self, registry, notes: list[str] | None = None) -> list[MethodEntry]:
        """Canonical method entries (aliases resolved); ``None`` means the default grid's methods.

        An exact repeat (same method, config and learning rate, maybe through an alias) is dropped,
        with a line in ``notes``; the same method and config with two learning rates is an error."""
        raw = self.methods if self.methods is not None else [MethodEntry(name=n) for n in default_methods(registry)]
        entries, seen = [], {}
        for i, entry in enumerate(raw):
            try:
                name = registry.canonical(entry.name)
            except ConfigError as exc:
                raise ConfigError(f"field 'methods.{i}': {exc}") from None
            init = self.init_from if entry.init_from is None else entry.init_from
            if init is not None and entry.init_from is None:
                entry = entry.model_copy(update={"init_from": init})
            # one method twice is fine with two configs (an ablation), or from scratch and from an adapter
            key = (name, canonical_json(entry.config), canonical_json(init.model_dump() if init else None),
                   entry.gradient_checkpointing)
            if key in seen:
                first = raw[seen[key]]
                if first.lr != entry.lr:
                    same = " with the same config" if entry.config else ""
                    raise ConfigError(f"field 'methods.{i}': method {name!r} is listed twice{same} but with learning "
                                      f"rates {first.lr} and {entry.lr} (also methods.{seen[key]}); give one")
                alias = f" ({entry.name!r} is {name!r})" if entry.name != name else ""
                if notes is not None:
                    notes.append(f"method {name!r} is listed twice{alias}; it runs once")
                continue
            seen[key] = i
            entries.append(entry.model_copy(update={"name": name}))
        return entries

    def unique_budgets(self, notes: list[str] | None = None) -> list[str]:
        """The budgets without repeats (``1%`` and ``1.0%`` are one; ``1M`` and ``1000k`` too), in order."""
        out, seen = [], {}
        for text in self.budgets:
            key = parse_budget(text).key
            if key in seen:
                if notes is not None:
                    notes.append(f"budget {text} is listed twice" + (f" (as {seen[key]})" if seen[key] != text else "")
                                 + "; it runs once")
                continue
            seen[key] = text
            out.append(text)
        return out

    def identity(self) -> dict:
        """What identifies the suite's results: everything but where and how it runs."""
        data = self.model_dump(mode="json", exclude=set(SUITE_RUN_ONLY))
        for entry in data.get("methods") or []:  # added later: only when set, so older suites keep their hash
            for key in ("init_from", "gradient_checkpointing"):
                if entry.get(key) is None:
                    entry.pop(key, None)
        for key in RUN_ONLY:
            data["training"].pop(key, None)
        for key in ADDED_SUITE_FIELDS:  # added later: in the identity only when set, so older suites keep theirs
            if data.get(key) is None:
                data.pop(key, None)
        if "search" in data and not data["search"]["trials"]:  # 0 trials: no search, the suite it was without one
            data.pop("search")
        for key in ADDED_TRAINING_FIELDS:
            if data["training"].get(key) is None:
                data["training"].pop(key, None)
        return data

    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:16]


#: suite fields added after suites were first stored (identity only when set)
ADDED_SUITE_FIELDS = ("preset", "search", "init_from")
#: suite fields that say where and how the grid runs, not what it computes (left out of the hash)
SUITE_RUN_ONLY = ("suite", "out", "executor", "ray", "artifacts_dir")


def default_methods(registry) -> list[str]:
    """The methods of the default grid (each declares ``in_default_grid``): reference baselines first."""
    names = [name for name, entry in registry.methods.items() if getattr(entry.obj, "in_default_grid", False)]
    refs = {name: getattr(registry.methods[name].obj, "reference", None) for name in names}
    rank = {role: i for i, role in enumerate(REFERENCE_ROLES)}  # full fine-tuning (the ceiling), then the floor
    return sorted(names, key=lambda n: (refs[n] is None, rank.get(refs[n], len(rank)), n))


# -- YAML ------------------------------------------------------------------------------------
def merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists too) is replaced by ``over``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict:
    """A suite file with its ``include:`` list resolved (includes first, the file itself wins)."""
    path = Path(path).expanduser().resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"suite config includes itself: {chain}")
    if not path.is_file():
        where = f" (included from {_stack[-1]})" if _stack else ""
        raise ConfigError(f"suite config {str(path)!r} does not exist{where}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"suite config {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"suite config {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"suite config {path} must be a mapping of fields, got {type(data).__name__}")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"suite config {path}: field 'include' must be a path or a list of paths")
    merged: dict = {}
    for inc in includes:
        merged = merge(merged, read_yaml(path.parent / inc, (*_stack, path)))
    return merge(merged, data)


def build_suite(config_path: str | Path | None = None, overrides: dict | None = None) -> SuiteConfig:
    """Defaults < YAML (with includes) < ``overrides`` (from the command line)."""
    data = read_yaml(config_path) if config_path else {}
    return validate_suite(merge(data, overrides or {}), config_path)


#: named schedules: training settings a suite starts from (``preset: converged``), its own win
PRESETS: dict[str, dict] = {
    # long enough that the methods converge on the packaged tasks (validation stops improving), with
    # early stopping on validation and a cap: evaluation every 50 steps, stop after 5 passes without gain
    "converged": {"epochs": 20, "step_cap": 3000, "eval_every": 50, "patience": 5},
}


def validate_suite(data: dict, source: str | Path | None = None) -> SuiteConfig:
    """A SuiteConfig from merged data; errors name the field path (and the file)."""
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"field 'preset': {preset!r} is not a schedule preset; allowed: {', '.join(PRESETS)}")
        data = merge({"training": PRESETS[preset]}, data)
    try:
        return SuiteConfig(**data)
    except ValidationError as exc:
        where = f"suite config {source} (with the command line): " if source else "suite config: "
        raise ConfigError(format_validation_error(where, exc)) from None
