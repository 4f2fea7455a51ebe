"""Equal-effort search: the ``search:`` section, its declared space, and Optuna's part in it.

Every (task, backbone, method, budget) group gets the same number of search trials over one
declared space, sampled by Optuna (ask-and-tell) and selected on validation only; the final
seeds then train at the selected values (``running.searching`` drives the rounds).

The space is by default the learning rate, log-uniform over one decade each side of the
method's declared ``default_lr``. A declared space (``--search PARAM=LOW:HIGH[:log]`` or
``PARAM=V1,V2,...``, or the YAML mapping) replaces it and may name the learning rate ``lr``,
a training field (``warmup_ratio``, ``weight_decay`` ...) or a method config field
(``alpha``, ``dropout``; applied to the methods whose config has it).

Optuna is used statelessly, so a resumed search asks what an uninterrupted one would: the
study of a group is rebuilt from the store's trials before each ask (a finished trial is told
to it again), with the sampler seeded by the suite's search seed and the trial's index. A
trial's pruning decision is Optuna's too: the worker that runs the trial gets the group's
finished trials (``Pruning``), rebuilds an in-memory study with the suite's pruner, and asks
it at each validation pass (``pruning_callback``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peftbench.errors import ConfigError
from peftbench.results.records import TrainingSpec

Scalar = Union[bool, int, float, str, None]
#: training fields that define the data selection reads or how it is evaluated, or that change only memory and
#: time (gradient checkpointing): never searched
NOT_SEARCHABLE = ("eval_limit", "test_limit", "data_seed", "eval_batch_size", "eval_every", "max_new_tokens",
                  "gradient_checkpointing")
SEARCHABLE_TRAINING = tuple(name for name in TrainingSpec.model_fields if name not in NOT_SEARCHABLE)
SAMPLERS = ("tpe", "grid", "random")
PRUNERS = ("median", "none")
HOW = "write PARAM=LOW:HIGH, PARAM=LOW:HIGH:log or PARAM=V1,V2,..."


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Frozen):
    """A continuous (or integer, when both ends are integers) range; ``log``: sampled log-uniformly."""

    low: int | float
    high: int | float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError("LOW must be below HIGH")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs LOW > 0")
        return self

    def text(self) -> str:
        return f"{_num(self.low)}:{_num(self.high)}{':log' if self.log else ''}"


class Choice(_Frozen):
    """A list of values (what the grid sampler samples: a range is first cut into points, see ``strata``)."""

    values: list[Scalar] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct(cls, values):
        if len({repr(v) for v in values}) != len(values):
            raise ValueError("the values repeat")
        return values

    def text(self) -> str:
        return ",".join(_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                        for v in self.values)


Param = Union[Range, Choice]


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _scalar(text: str) -> Scalar:
    """``8`` -> 8, ``1e-3`` -> 0.001, ``true`` -> True, ``null`` -> None, anything else stays text."""
    word = text.strip()
    lowered = word.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    return word


def parse_param(name: str, value: Any) -> Param:
    """One declared parameter from its text (``1e-5:1e-2:log``, ``8,16,32``), a list or a mapping."""
    if isinstance(value, (Range, Choice)):
        return value
    try:
        if isinstance(value, dict):
            return Choice(**value) if "values" in value else Range(**value)
        if isinstance(value, list):
            return Choice(values=value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return Choice(values=[value])
        if not isinstance(value, str) or not value.strip():
            raise ValueError(HOW)
        text = value.strip()
        if ":" in text:
            parts = [p.strip() for p in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "log"):
                raise ValueError(HOW)
            low, high = _scalar(parts[0]), _scalar(parts[1])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise ValueError("LOW and HIGH must be numbers")
            return Range(low=low, high=high, log=len(parts) == 3)
        return Choice(values=[_scalar(v) for v in text.split(",") if v.strip()])
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too: its first message, one line
        message = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        shown = value.strip() if isinstance(value, str) else value
        raise ValueError(f"{name}={shown}: {message.removeprefix('Value error, ')}") from None


class SearchConfig(BaseModel):
    """The ``search:`` section: N trials per group over ``space`` (None: lr around each method's default_lr)."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(0, ge=0, description="search trials per (task, backbone, method, budget); 0: no search")
    space: dict[str, Param] | None = Field(None, description="PARAM: LOW:HIGH[:log] | [V1, V2, ...]; "
                                                             "null: lr log-uniform, a decade each side of default_lr")
    sampler: Literal["tpe", "grid", "random"] = "tpe"
    pruner: Literal["median", "none"] = Field("median", description="stops hopeless trials at a validation pass")
    seed: int = Field(0, description="seed of the sampler")
    startup_trials: int = Field(5, ge=0, description="median pruner: complete trials before it prunes")
    warmup_steps: int = Field(0, ge=0, description="median pruner: steps of a trial before it may be pruned")

    @field_validator("space", mode="before")
    @classmethod
    def _parse(cls, value):
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError(f"a search space maps parameters to ranges or values ({HOW})")
        return {str(name): parse_param(str(name), v) for name, v in value.items()}

    @model_validator(mode="after")
    def _grid(self):
        if self.sampler != "grid" or not self.trials:
            return self
        lists = [p for p in (self.space or {"lr": None}).values() if isinstance(p, Choice)]
        if len(lists) < len(self.space or {"lr": None}):  # a range becomes ``trials`` points: enough on its own
            return self
        points = math.prod(len(p.values) for p in lists)
        if self.trials > points:
            raise ValueError(f"the grid has {points} point(s), fewer than the {self.trials} search trials asked for; "
                             f"give --search-trials {points} or more values")
        return self

    @property
    def active(self) -> bool:
        return self.trials > 0

    def describe(self) -> str:
        pruner = "no pruner" if self.pruner == "none" else \
            f"median pruner (after {self.startup_trials} complete trials, {self.warmup_steps} warm-up steps)"
        return f"{self.sampler} sampler (seed {self.seed}), {pruner}"


def active_search(suite) -> SearchConfig | None:
    """The suite's search, or None when it has none (or 0 trials)."""
    config = getattr(suite, "search", None)
    return config if config is not None and config.active else None


# -- the space of one method -------------------------------------------------------------------
def _annotation_is_int(annotation) -> bool:
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a is int for a in args)


def _typed(name: str, param: Param, integer: bool) -> Param:
    """Integer fields take integer ranges; other numeric fields float ranges."""
    if not isinstance(param, Range):
        return param
    if integer:
        if any(float(v) != int(v) for v in (param.low, param.high)):
            raise ConfigError(f"field 'search.space.{name}': {name} is an integer; {param.text()} has a fraction")
        return Range(low=int(param.low), high=int(param.high), log=param.log)
    return Range(low=float(param.low), high=float(param.high), log=param.log)


def method_space(config: SearchConfig, method) -> dict[str, Param]:
    """The space a method searches: the declared params that apply to it, typed (ints stay ints)."""
    space = _declared_space(config, method)
    if config.sampler != "grid":
        return space
    return {name: strata(name, p, config.trials) if isinstance(p, Range) else p for name, p in space.items()}


def strata(name: str, param: Range, n: int) -> Choice:
    """A range cut into ``n`` equal strata (in log space for a log range), each represented by its midpoint.

    With 3 trials over lr in [c/10, 10c] (log): c/10^(2/3), c, 10^(2/3)c. Unlike n random draws,
    the points cannot bunch up: each trial covers its own n-th of the range. Integer ranges are
    rounded; one that has fewer than ``n`` distinct integers is refused.
    """
    low, high = float(param.low), float(param.high)
    if param.log:
        values = [low * (high / low) ** ((i + 0.5) / n) for i in range(n)]
    else:
        values = [low + (high - low) * (i + 0.5) / n for i in range(n)]
    if isinstance(param.low, int):
        values = list(dict.fromkeys(int(round(v)) for v in values))
        if len(values) < n:
            raise ConfigError(f"field 'search.space.{name}': the integer range {param.text()} has fewer than "
                              f"{n} distinct points for the grid's {n} trials; widen it or list values")
    else:
        values = [float(f"{v:.4g}") for v in values]
    return Choice(values=values)


def _declared_space(config: SearchConfig, method) -> dict[str, Param]:
    if config.space is None:
        centre = float(method.default_lr)
        return {"lr": Range(low=centre / 10, high=centre * 10, log=True)}
    out = {}
    for name, param in config.space.items():
        if name == "lr":
            out[name] = _typed(name, param, False)
        elif name in SEARCHABLE_TRAINING:
            out[name] = _typed(name, param, _annotation_is_int(TrainingSpec.model_fields[name].annotation))
        elif name in method.Config.model_fields and name != method.knob:
            out[name] = _typed(name, param, _annotation_is_int(method.Config.model_fields[name].annotation))
    return out


def check_space(config: SearchConfig, methods) -> None:
    """Every declared parameter applies to some selected method; knobs and data fields are refused."""
    if config.space is None:
        return
    fields = sorted({f for m in methods for f in m.Config.model_fields if f != m.knob})
    for name in config.space:
        knobs = [m.name for m in methods if m.knob == name]
        if knobs:
            raise ConfigError(f"field 'search.space.{name}': {name!r} is the size knob of {', '.join(knobs)}, set by "
                              f"the budget solver; it is not searched")
        if name in NOT_SEARCHABLE:
            raise ConfigError(f"field 'search.space.{name}': {name!r} defines the data or the evaluation that "
                              f"selection reads; it is not searched")
        if name != "lr" and name not in SEARCHABLE_TRAINING and name not in fields:
            raise ConfigError(f"field 'search.space.{name}': unknown parameter {name!r}; allowed: lr, training "
                              f"fields ({', '.join(SEARCHABLE_TRAINING)}), method fields of the selected methods "
                              f"({', '.join(fields) or 'none'})")


def space_json(space: dict[str, Param]) -> dict[str, Any]:
    """The space as stored on a spec: ``{"lr": {"low": 1e-4, "high": 1e-2, "log": true}, "alpha": {"values": [8, 16]}}``."""
    return {name: param.model_dump(mode="json") for name, param in space.items()}


def space_from_json(data: dict[str, Any]) -> dict[str, Param]:
    return {name: parse_param(name, value) for name, value in data.items()}


def describe_space(space: dict[str, Param]) -> str:
    return ", ".join(f"{name}={param.text()}" for name, param in space.items())


def grid_points(space: dict[str, Param]) -> list[dict]:
    names = sorted(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n].values for n in names))]


# -- Optuna ------------------------------------------------------------------------------------
class PastTrial(_Frozen):
    """A finished search trial of the group, as the study is told it."""

    params: dict[str, Any]
    state: Literal["complete", "pruned", "fail"]
    value: float | None = None
    intermediate: dict[int, float] = Field(default_factory=dict, description="validation value by step")


class Pruning(_Frozen):
    """What the worker running search trial ``number`` needs to rebuild its group's study and prune."""

    direction: Literal["max", "min"]
    pruner: Literal["median", "none"]
    startup_trials: int
    warmup_steps: int
    space: dict[str, Any]
    number: int
    past: list[PastTrial] = Field(default_factory=list)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def distributions(space: dict[str, Param]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, param in space.items():
        if isinstance(param, Choice):
            out[name] = CategoricalDistribution(param.values)
        elif isinstance(param.low, int) and isinstance(param.high, int):
            out[name] = IntDistribution(param.low, param.high, log=param.log)
        else:
            out[name] = FloatDistribution(float(param.low), float(param.high), log=param.log)
    return out


def _study(direction: str, sampler, pruner, space: dict[str, Param], past: list[PastTrial]):
    optuna = _optuna()
    study = optuna.create_study(direction="maximize" if direction == "max" else "minimize", sampler=sampler,
                                pruner=pruner)
    dists = distributions(space)
    states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
              "fail": optuna.trial.TrialState.FAIL}
    for trial in past:  # told again, in order: trial numbers are search indices
        params = {n: trial.params[n] for n in dists if n in trial.params}
        study.add_trial(optuna.trial.create_trial(
            state=states[trial.state], value=None if trial.state == "fail" else trial.value, params=params,
            distributions={n: dists[n] for n in params}, intermediate_values=dict(trial.intermediate)))
    return study


def _seed(seed: int, index: int) -> int:
    """A sampler seed per (search seed, trial index): the same ask on a resumed run."""
    return int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:8], 16)


def make_sampler(config: SearchConfig, space: dict[str, Param], index: int):
    samplers = _optuna().samplers
    if config.sampler == "grid":  # one shuffled order per seed: trial i takes its i-th point
        return samplers.GridSampler({n: p.values for n, p in space.items()}, seed=config.seed)
    if config.sampler == "random":
        return samplers.RandomSampler(seed=_seed(config.seed, index))
    return samplers.TPESampler(seed=_seed(config.seed, index))


def make_pruner(name: str, startup_trials: int, warmup_steps: int):
    pruners = _optuna().pruners
    if name == "none":
        return pruners.NopPruner()
    return pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)


def ask(config: SearchConfig, space: dict[str, Param], direction: str, past: list[PastTrial]) -> dict[str, Any]:
    """The values of the next trial: the group's finished trials told to a fresh study, then one ask."""
    study = _study(direction, make_sampler(config, space, len(past)), None, space, past)
    trial = study.ask(distributions(space))
    return {name: trial.params[name] for name in space}


def pruning_callback(pruning: Pruning | None) -> Callable[[int, float], bool] | None:
    """``report(step, value) -> prune?`` for a search trial: Optuna's pruner over the group's study."""
    if pruning is None or pruning.pruner == "none":
        return None
    optuna = _optuna()
    space = space_from_json(pruning.space)
    study = _study(pruning.direction, optuna.samplers.RandomSampler(seed=0),
                   make_pruner(pruning.pruner, pruning.startup_trials, pruning.warmup_steps), space, pruning.past)
    trial = study.ask()  # trial number ``pruning.number``: this one

    def report(step: int, value: float) -> bool:
        trial.report(float(value), step)
        return bool(trial.should_prune())

    return report
