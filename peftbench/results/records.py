"""What a trial is and what came back, as two typed records built once.

``TrialSpec`` is built by the planner (``running.plan``) from the suite and the budget solver:
the task, backbone, method with its resolved config, budget, seed, every training setting
(the learning rate included) and the trial's role. It also carries the planner's facts about
the trial's size (knob, trainable and stored parameters, the target), computed once: the
trial checks them by instantiation, the store saves them, the report reads them. Nobody
re-derives them.

``TrialResult`` is what running the trial returned: metrics, the kept checkpoint, costs,
curves, environment. ``TrialRecord`` is one stored row: a spec, its state, its result.

Run options (device, threads, saving weights, where artifacts go) are not trial identity:
they live in ``running.options.RunOptions`` and never enter a ``TrialSpec``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from peftbench.contract.costs import Cost
from peftbench.tasks.entry import TaskEntry

#: ``final``: a seed of the comparison (reads test once); ``search``: a hyper-parameter search trial
#: (selected on validation, never evaluated on test)
ROLES = ("final", "search")
STATUSES = ("running", "done", "failed", "diverged", "unreachable")
#: the roles a reference baseline declares (``Method.reference``): ``ceiling`` (full fine-tuning, the
#: zero of the relative plot) and ``floor`` (only the task head trained)
CEILING, FLOOR = "ceiling", "floor"
REFERENCE_ROLES = (CEILING, FLOOR)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def canonical_json(data: Any) -> str:
    """The one JSON text of ``data`` that hashes use (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


#: training fields added after trials were first stored: left out of an id while unset, so the
#: trials stored before them keep their ids
ADDED_TRAINING_FIELDS = ("step_cap", "gradient_checkpointing")
#: method config fields added later (placement, ``contract.placement``) with their defaults: at the default
#: they stay out of the id, so a trial keeps the id it had before they existed
ADDED_METHOD_FIELDS = {"layers": None, "layer_sizes": None, "allocation": "uniform", "allocation_steps": 20}


def method_config_dump(cfg) -> dict:
    """A method config as a trial stores it: the added fields above left out at their defaults, except
    those its config class names in ``id_fields_at_default`` (fields it had, and stored, before they
    became common to every per-layer method), so every trial keeps the id it had before."""
    data = cfg.model_dump(mode="json")
    keep = getattr(type(cfg), "id_fields_at_default", ())
    for key, default in ADDED_METHOD_FIELDS.items():
        if key in data and data[key] == default and key not in keep:
            del data[key]
    return data


class TrainingSpec(_Frozen):
    """How a trial trains: every setting that can change its numbers (the learning rate is on the spec)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    step_cap: int | None = Field(None, ge=1, description="at most this many optimizer steps, however many epochs")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | None = Field(
        None, description="recompute each layer's activations in the backward pass instead of keeping them (less "
                          "memory, more time per step); false is stored as null (off), so ids stay as they were")

    @field_validator("gradient_checkpointing")
    @classmethod
    def _off_is_unset(cls, value: bool | None) -> bool | None:
        return value or None


class TrialSpec(_Frozen):
    """One trial, fully resolved. ``trial_id`` hashes what it computes (``identity()``)."""

    suite: str
    role: Literal["final", "search"] = "final"
    task: TaskEntry
    backbone: str
    method: str
    method_config: dict[str, Any] = Field(default_factory=dict)
    budget: str | None = None
    seed: int
    lr: float = Field(gt=0)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    # -- the task's metric (from the task, once) ------------------------------------------
    primary_metric: str
    direction: Literal["max", "min"]
    # -- size, as planned by the solver and checked by instantiation when the trial runs --
    knob: str | None = None
    knob_value: int | None = None
    knob_step: int | None = Field(None, description="parameters one knob step adds near the solved value")
    target_params: int | None = Field(None, description="the budget's target; None: the budget does not apply")
    trainable_params: int = Field(description="the method's trainable parameters, task head excluded")
    stored_params: int = Field(description="parameters kept after training (prefix tuning drops its MLP)")
    head_params: int
    base_params: int
    reference: str | None = Field(None, description="the method's reference-baseline role (ceiling, floor), if any")
    reachable: bool = True
    pinned: bool = Field(False, description="the user fixed the method's size (its knob is not solved)")
    matched: bool = Field(True, description="budget-matched: ranked with the others (unreachable or pinned "
                                            "outside the tolerance: ranked apart)")
    note: str = Field("", description="the solver's note (why a budget is unreachable, what it replaced)")
    variant: str = Field("", description="which of a method's configs, when a suite lists the method twice")
    # -- search ------------------------------------------------------------------------------
    search_index: int | None = Field(None, description="a search trial's number within its group's search")
    search_params: dict[str, Any] = Field(default_factory=dict,
                                          description="search: the sampled values; final: the selected ones")
    search_space: dict[str, Any] = Field(default_factory=dict, description="the space searched, as declared")
    # -- two-stage training ------------------------------------------------------------------
    init_from: dict[str, Any] = Field(default_factory=dict, description="the trained adapter the trial starts from "
                                      "(running.init_from): source, path, weights_sha256, task_head; empty: none")

    @field_validator("method_config")
    @classmethod
    def _plain(cls, value: dict) -> dict:
        return json.loads(canonical_json(value))  # JSON-plain: equal configs compare and hash equal

    def identity(self) -> dict:
        """What the trial computes: the same dict gives the same id (run options never enter it)."""
        training = self.training.model_dump(mode="json")
        for name in ADDED_TRAINING_FIELDS:  # fields added later enter the id only when set
            if training.get(name) is None:
                training.pop(name, None)
        data = {
            "task": self.task.model_dump(mode="json"),
            "backbone": self.backbone,
            "method": self.method,
            "method_config": self.method_config,  # as method_config_dump left it
            "budget": self.budget,
            "seed": self.seed,
            "lr": self.lr,
            "training": training,
        }
        # only what differs from a plain final trial enters: final trials keep the ids earlier versions gave them
        if self.role != "final":
            data["role"] = self.role
        if self.search_index is not None:
            data["search_index"] = self.search_index
        if self.search_params:
            data["search_params"] = self.search_params
        if self.init_from:  # what the start computes from: the source's weights (not where they lie) and the task head
            data["init_from"] = {"weights_sha256": self.init_from["weights_sha256"],
                                 "task_head": self.init_from["task_head"]}
        return data

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()

    @property
    def trial_id(self) -> str:
        return self.config_hash[:16]

    @property
    def display(self) -> str:
        """The method's name, with its variant when the suite lists the method twice."""
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def achieved_pct(self) -> float:
        return 100 * self.trainable_params / self.base_params if self.base_params else 0.0

    @property
    def label(self) -> str:
        """``task backbone method budget seed N`` with file paths shortened (progress lines)."""
        def short(name: str) -> str:
            return Path(name.removeprefix("file:")).name if "/" in name else name

        role = " (search)" if self.role == "search" else ""
        return (f"{short(self.task.name)} {short(self.backbone)} {self.method} {self.budget or '(no budget)'} "
                f"seed {self.seed}{role}")


class CurvePoint(_Frozen):
    step: int
    loss: float | None = None
    val_metric: float | None = None


class MachineLoad(_Frozen):
    """How busy the machine was at one moment: ``os.getloadavg()[0]`` and its CPUs (None: the OS does not say).

    The load average counts runnable (and uninterruptible) threads of the whole machine, the
    trial's own included: a trial alone with one thread per CPU reads about ``cpu_count``.
    """

    load_1min: float | None = None
    cpu_count: int | None = Field(None, description="os.cpu_count(): the machine's CPUs")
    usable_cpus: int | None = Field(None, description="os.sched_getaffinity: the CPUs this process may run on")

    @property
    def per_cpu(self) -> float | None:
        """The 1-minute load average per CPU of the machine (> 1: more runnable threads than CPUs)."""
        if self.load_1min is None or not self.cpu_count:
            return None
        return self.load_1min / self.cpu_count


class TrialResult(_Frozen):
    """What a trial returned. A failed or diverged trial returns what it got so far."""

    metrics: dict[str, float] = Field(default_factory=dict, description="test metrics (final trials only)")
    val_metrics: dict[str, float] = Field(default_factory=dict, description="validation metrics of the kept checkpoint")
    best_step: int | None = Field(None, description="the step whose weights were kept (best validation)")
    stored_bytes: int | None = None
    costs: dict[str, Cost] = Field(default_factory=dict, description="a method's own cost figures (4-bit bytes ...)")
    step_time_s: float | None = None
    peak_mem_bytes: int | None = None
    mem_kind: str | None = None
    mem_start_bytes: int | None = Field(None, description="the memory (of mem_kind) when the peak's measurement "
                                                           "started: peak minus it is what training added")
    inference_overhead: float | None = None
    train_time_s: float | None = None
    steps: int | None = None
    curves: list[CurvePoint] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    artifacts: str | None = None
    # -- for the diagnostics -----------------------------------------------------------------
    pruned: bool = Field(False, description="a search trial the pruner stopped early (its value: the best so far)")
    stopped_early: bool | None = Field(None, description="patience ended training before the planned steps")
    planned_steps: int | None = Field(None, description="the steps the schedule allowed (epochs or cap)")
    last_eval_step: int | None = Field(None, description="the step of the last validation pass")
    chance: dict[str, float] = Field(default_factory=dict,
                                     description="test metrics of the majority-class prediction (final trials)")
    splits: dict[str, str] = Field(default_factory=dict, description="where each split came from (carved or the task's)")
    # -- for the setup and the costs -----------------------------------------------------------
    examples: dict[str, int] = Field(default_factory=dict,
                                     description="examples per split the trial used (train, validation, test)")
    load_start: MachineLoad | None = Field(None, description="the machine's load when the trial started")
    load_end: MachineLoad | None = Field(None, description="the machine's load when it ended (its costs measured)")


class TrialRecord(_Frozen):
    """One stored trial: its spec, its state, its result (None until it ran)."""

    trial_id: str
    spec: TrialSpec
    status: Literal["running", "done", "failed", "diverged", "unreachable"]
    error: str | None = None
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    result: TrialResult | None = None

    @property
    def done(self) -> bool:
        return self.status == "done"
