"""Suite configuration: what ``peftbench run`` trains, validated by pydantic.

A suite is YAML (``configs/*.yaml``; ``include:`` other files, relative to the including
file, merged with later values winning) overridden by command-line flags. Unknown keys are
errors that name the field path and the file. The defaults are the embedded comparison:
``minilm`` on ``movie_sentiment``, every built-in method plus ``full`` and ``head``, a 1%
budget, 3 seeds, and a training length that finishes on 2 CPU cores in 15 minutes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftbench.budget import parse_budget
from peftbench.errors import BudgetError, ConfigError
from peftbench.contract.method import format_validation_error

DEFAULT_TASK = "movie_sentiment"
DEFAULT_BACKBONE = "minilm"
DEFAULT_BUDGET = "1%"
DEFAULT_SEEDS = 3
#: built-in methods left out of the default grid (``topk`` is optional: ``--methods ...,topk``)
OPTIONAL_METHODS = ("topk",)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: learning rates for the default schedule (50 steps of 16 on MiniLM, linear decay): the best of three
#: values per method by best-checkpoint VALIDATION accuracy in a one-seed sweep on movie_sentiment
#: (``python benchmarks/lr_sweep.py``; validation accuracy of the three values in brackets, 200 examples,
#: 0.46 = the majority class). Test accuracy played no part. At the methods' own default_lr most stay at
#: chance in 50 steps. Methods not listed use their ``default_lr``; ``--lr``/``training.lr`` entries
#: override these one by one. For long schedules the methods' own defaults are the better start.
DEFAULT_LR: dict[str, float] = {
    "full": 2e-4,  # (5e-5: 0.480, 1e-4: 0.780, 2e-4: 0.795)
    "head": 3e-2,  # (3e-3: 0.460, 1e-2: 0.470, 3e-2: 0.540) the head alone stays near chance in 50 steps
    "lora": 5e-3,  # (2e-3: 0.520, 5e-3: 0.805, 1e-2: 0.795)
    "qlora": 5e-3,  # (2e-3: 0.460, 5e-3: 0.805, 1e-2: 0.785)
    "adapter_lora": 5e-3,  # (2e-3: 0.645, 5e-3: 0.805, 1e-2: 0.785)
    "houlsby": 3e-3,  # (1e-3: 0.460, 3e-3: 0.755, 1e-2: 0.705)
    "pfeiffer": 1e-2,  # (3e-3: 0.640, 1e-2: 0.790, 3e-2: 0.460)
    "ptuning_v2": 1e-1,  # (1e-2: 0.460, 3e-2: 0.640, 1e-1: 0.650)
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodEntry(_Strict):
    """A method with config overrides and its own learning rate: ``{name: lora, config: {alpha: 16}, lr: 5e-4}``."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0)


class TaskEntry(_Strict):
    """A task; ``file:``/``hub:`` tasks name their columns (``text_columns: [text]``, ``label_column: label``)."""

    name: str
    text_columns: list[str] | None = None
    label_column: str | None = None
    kind: Literal["classification", "generation"] | None = Field(None, description="file:/hub: tasks (default classification)")

    @field_validator("text_columns", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class TrainingConfig(_Strict):
    """How every trial trains. ``lr`` maps a method to its learning rate (else ``method.default_lr``)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LR))
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(128, ge=8)
    eval_every: int | None = Field(25, ge=1, description="steps between validation passes; null: 4 per trial")
    patience: int | None = Field(3, ge=1, description="validation passes without improvement before stopping; null: never")
    train_limit: int | None = Field(800, ge=1, description="seeded subsample of the training split; null: all of it")
    eval_limit: int | None = Field(200, ge=1, description="seeded subsample of validation; null: all of it")
    test_limit: int | None = Field(500, ge=1, description="seeded subsample of test; null: all of it")
    data_seed: int = Field(0, description="seed of the subsamples (the same for every method and seed)")
    max_new_tokens: int = Field(64, ge=1, description="generation tasks: greedy decoding length")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: the CPUs this process may use)")
    save_weights: bool = Field(True, description="save each trial's adapter weights (safetensors) in its folder")

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
    #: null: every built-in method (``full`` and ``head`` included, ``topk`` left out)
    methods: list[MethodEntry] | None = None
    budgets: list[str] = Field(default_factory=lambda: [DEFAULT_BUDGET], min_length=1)
    seeds: int | list[int] = DEFAULT_SEEDS
    executor: Literal["local", "ray"] = Field("local", description="where trials run: local (in this process) or ray")
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    artifacts_dir: str | None = Field(None, description="trial artifacts: a folder or an fsspec URL (default: OUT/SUITE/trials)")
    training: TrainingConfig = Field(default_factory=TrainingConfig)

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

    def method_entries(self, registry) -> list[MethodEntry]:
        """Canonical method entries (aliases resolved); ``None`` means every built-in method."""
        raw = self.methods if self.methods is not None else [MethodEntry(name=n) for n in builtin_methods(registry)]
        entries, seen = [], {}
        for i, entry in enumerate(raw):
            try:
                name = registry.canonical(entry.name)
            except ConfigError as exc:
                raise ConfigError(f"field 'methods.{i}': {exc}") from None
            if name in seen:
                raise ConfigError(f"field 'methods.{i}': method {name!r} is listed twice (also methods.{seen[name]})")
            seen[name] = i
            entries.append(entry.model_copy(update={"name": name}))
        return entries

    def hash(self) -> str:
        """What identifies the suite's results (run-only options such as device left out)."""
        data = self.model_dump(mode="json", exclude=set(SUITE_RUN_ONLY))
        for key in RUN_ONLY:
            data["training"].pop(key, None)
        return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


#: training options that change how a trial runs, not what it computes (left out of ids and hashes)
RUN_ONLY = ("device", "threads", "save_weights")
#: suite fields that say where and how the grid runs, not what it computes (left out of the hash)
SUITE_RUN_ONLY = ("suite", "out", "executor", "ray", "artifacts_dir")


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def builtin_methods(registry) -> list[str]:
    """Every method registered by the built-in plugins (``peftbench_plugins``), minus the optional ones."""
    names = []
    for name, entry in registry.methods.items():
        plugin = registry.pm.get_plugin(entry.plugin)
        module = getattr(plugin, "__name__", "")
        if module.startswith("peftbench_plugins") and name not in OPTIONAL_METHODS:
            names.append(name)
    order = ["full", "head"]
    return sorted(names, key=lambda n: (n not in order, order.index(n) if n in order else 0, n))


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
        data = yaml.safe_load(path.read_text()) or {}
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


def validate_suite(data: dict, source: str | Path | None = None) -> SuiteConfig:
    """A SuiteConfig from merged data; errors name the field path (and the file)."""
    data = merge({"training": {"lr": dict(DEFAULT_LR)}}, data)  # an lr entry overrides one default, not all
    try:
        return SuiteConfig(**data)
    except ValidationError as exc:
        where = f"suite config {source} (with the command line): " if source else "suite config: "
        raise ConfigError(format_validation_error(where, exc)) from None
