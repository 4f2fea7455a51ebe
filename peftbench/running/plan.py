"""The plan: tasks x backbones x methods x budgets x seeds, each budget solved per method.

Budgeted methods get their knob from the solver on the backbone's spec; reference baselines
(full fine-tuning, the head alone) run once per seed whatever the budgets. Every cell becomes
one ``TrialSpec``, built here once: its learning rate, its size as the solver planned it, its
id (a hash of what it computes), so the same command names the same trials and a rerun skips
finished ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.backbones.backbone import spec_for
from peftbench.budget import parse_budget, solve, solved_config
from peftbench.report.format import table
from peftbench.errors import BudgetError, ConfigError
from peftbench.results.records import TrialSpec, method_config_dump
from peftbench.running.config import SuiteConfig, default_methods
from peftbench.tasks.data import backbone_task_kind, raw_data, task_for
from peftbench.tasks.entry import TaskEntry


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Plan:
    suite: SuiteConfig
    name: str
    trials: list[TrialSpec] = field(default_factory=list)  # every trial (unmatched ones at their nearest size)
    warnings: list[str] = field(default_factory=list)  # what the user should know before training (pinned sizes)
    data_warnings: list[str] = field(default_factory=list)  # what the tasks' checks found (dropped rows, thin labels)
    specs: dict = field(default_factory=dict)  # (task, backbone) -> BackboneSpec


def learning_rate(method, entry_lr: float | None, suite_lrs: dict[str, float]) -> float:
    """The trial's learning rate: the method entry's, else the finished suite's ``training.lr`` for
    the method (its declared ``schedule_lr`` unless the suite set one), else the method's default."""
    for value in (entry_lr, suite_lrs.get(method.name)):
        if value is not None:
            return float(value)
    return float(method.default_lr)


def make_plan(suite: SuiteConfig, registry) -> Plan:
    """Every trial of the grid, budgets solved; raises before training on a budget nobody reaches."""
    if not suite._finished:  # a suite from resolve_suite is finished already
        suite = finish_suite(suite.model_copy(deep=True), registry)
    methods = []
    twice = {e.name for e in suite.methods if sum(f.name == e.name for f in suite.methods) > 1}
    for entry in suite.methods:
        method = registry.method(entry.name)
        cfg = method.config(entry.config)
        checkpointing = entry.gradient_checkpointing
        variant = ", ".join([f"{k}={v}" for k, v in sorted(entry.config.items())]
                            + ([f"init_from={entry.init_from.short}"] if entry.init_from else [])
                            + ([f"{'' if checkpointing else 'no '}gradient checkpointing"] if checkpointing is not None
                               else []))
        variant = (variant or "defaults") if entry.name in twice or entry.init_from else ""
        methods.append(Planned(method, cfg, learning_rate(method, entry.lr, suite.training.lr),
                               frozenset(entry.config), method.pinned_fields(entry.config) if method.budgeted else [],
                               variant, entry.init_from, checkpointing))
    suite_training = suite.training.spec()
    plan = Plan(suite=suite, name=suite.suite, warnings=list(suite._notes))
    for task_entry in suite.tasks:
        task = task_for(task_entry, registry)
        raw_data(task, task_entry, suite_training)  # checks columns and labels now, not mid-grid
        plan.data_warnings += task.warnings
        for backbone in suite.backbones:
            spec = spec_for(backbone, task=backbone_task_kind(task), num_labels=max(task.num_labels, 1), registry=registry)
            plan.specs[(task_entry.name, backbone)] = spec
            solved = _solve_all(methods, spec, suite.budgets, backbone)
            for seed in suite.seed_list():
                for p, budget, sol in solved:
                    training = suite_training if p.checkpointing is None else suite_training.model_copy(
                        update={"gradient_checkpointing": p.checkpointing or None})
                    trial = _trial(plan.name, task_entry, task, backbone, spec, p.method, p.cfg, p.lr, budget, sol,
                                   seed, training, pinned=bool(p.pinned), variant=p.variant)
                    if p.init is not None:  # two-stage: the source is found and checked now, before training
                        from peftbench.running.init_from import resolve

                        trial = trial.model_copy(update={"init_from": resolve(p.init, trial, task.num_labels, registry)})
                    plan.trials.append(trial)
            plan.warnings += [f"{p.method.name} at {budget}: {sol.note}" for p, budget, sol in solved
                              if p.pinned and budget]
    return plan


@dataclass(frozen=True)
class Planned:
    """A method of the suite as the planner uses it: config, learning rate, what the user set."""

    method: object
    cfg: object
    lr: float
    given: frozenset  # config fields the user wrote
    pinned: list  # size fields among them: the size is the user's, not the solver's
    variant: str = ""  # which config, when the suite lists the method twice (or starts it from an adapter)
    init: object = None  # the entry's InitFrom (two-stage training), else None
    checkpointing: bool | None = None  # the entry's gradient_checkpointing (None: the training section's)


def _solve_all(methods: list[Planned], spec, budgets: list[str], backbone: str) -> list[tuple]:
    """[(Planned, budget or None, Solution)]: baselines once, budgeted methods per budget.

    A budget no method reaches is an error; a method that cannot reach one is trained at its
    nearest feasible size (not matched); a pinned method at its own size (matched within
    ``PIN_TOLERANCE`` of the target).
    """
    out = [(p, None, solve(p.method, p.cfg, spec, None)) for p in methods
           if not p.method.budgeted or p.method.knob is None]
    for budget in budgets:
        row = [(p, budget, _pinned(p, spec, budget) if p.pinned else solve(p.method, p.cfg, spec, budget, p.given))
               for p in methods if p.method.budgeted and p.method.knob]
        solved = [sol for p, _, sol in row if not p.pinned]
        if solved and not any(sol.reachable for sol in solved):
            notes = "; ".join(f"{p.method.name}: {sol.note}" for p, _, sol in row if not p.pinned)
            raise BudgetError(f"budget {budget} ({solved[0].target:,} params of {spec.base_params:,} in {backbone}) "
                              f"is reachable by none of the selected methods: {notes}")
        out += row
    return out


#: a pinned size within this fraction of the budget's target counts as budget-matched
PIN_TOLERANCE = 0.10


def _pinned(p: Planned, spec, budget: str):
    """The solution of a user-pinned size: its own count against the budget's target, never replaced."""
    sol = solve(p.method, p.cfg, spec, None)
    target = parse_budget(budget).target(spec.base_params)
    off = (sol.params - target) / target
    fields = ", ".join(f"{f}={getattr(p.cfg, f)}" for f in p.pinned)
    sol.target, sol.reachable = target, abs(off) <= PIN_TOLERANCE
    sol.note = (f"size pinned by the user ({fields}; the solver leaves it): {sol.params:,} trainable parameters, "
                f"{100 * sol.params / spec.base_params:.3g}% of the backbone, {off:+.1%} against the {budget} target "
                f"({'within' if sol.reachable else 'outside'} the ±{PIN_TOLERANCE:.0%} tolerance: "
                f"{'budget-matched' if sol.reachable else 'not budget-matched, ranked apart'})")
    return sol


def _trial(suite_name_: str, task_entry: TaskEntry, task, backbone: str, spec, method, cfg, lr: float,
           budget: str | None, sol, seed: int, training, role: str = "final", pinned: bool = False,
           variant: str = "") -> TrialSpec:
    if budget and not pinned:  # the solver's size (and a secondary width it chose)
        cfg = solved_config(method, cfg, sol)
    return TrialSpec(
        suite=suite_name_, role=role, task=task_entry, backbone=backbone, method=method.name,
        method_config=method_config_dump(cfg), budget=budget, seed=seed, lr=lr, training=training,
        primary_metric=task.primary_metric, direction=task.direction, knob=method.knob,
        knob_value=method.knob_value(cfg) if method.knob else None,
        knob_step=sol.step,
        target_params=sol.target, trainable_params=sol.params, stored_params=sol.stored,
        head_params=spec.head_params, base_params=spec.base_params, reference=getattr(method, "reference", None),
        reachable=sol.reachable, pinned=pinned, matched=sol.reachable, note=sol.note, variant=variant,
    )


def with_values(plan: Plan, spec: TrialSpec, values: dict, registry, **update) -> TrialSpec:
    """``spec`` at other hyper-parameter values (a search's sampled or selected ones): ``lr``, training
    fields, method config fields; the budget is solved again when a method field changes, since it
    may change the size. ``update``: other spec fields (role, search_index, search_params ...)."""
    from peftbench.budget import solved_config
    from peftbench.results.records import TrainingSpec

    training = {k: v for k, v in values.items() if k in TrainingSpec.model_fields}
    fields = {k: v for k, v in values.items() if k != "lr" and k not in training}
    data = {**spec.model_dump(), "lr": float(values.get("lr", spec.lr)), **update}
    if training:
        data["training"] = TrainingSpec(**{**spec.training.model_dump(), **training})
    if fields:
        method = registry.method(spec.method)
        cfg = method.config({**spec.method_config, **fields})
        budget = None if spec.pinned else spec.budget  # a size the user pinned stays
        sol = solve(method, cfg, plan.specs[(spec.task.name, spec.backbone)], budget)
        if not sol.reachable:
            raise BudgetError(f"{spec.method} at {spec.budget} with {fields}: {sol.note}")
        cfg = solved_config(method, cfg, sol) if budget else cfg
        data.update(method_config=method_config_dump(cfg), knob_value=method.knob_value(cfg) if method.knob else None,
                    trainable_params=sol.params, stored_params=sol.stored)
        if budget:
            data.update(knob_step=sol.step, target_params=sol.target)
    return TrialSpec(**data)


def trial_spec(registry, *, task: TaskEntry, backbone: str, method: str, method_config: dict | None = None,
               seed: int = 0, lr: float | None = None, training=None, budget: str | None = None,
               suite: str = "adhoc", role: str = "final") -> TrialSpec:
    """One trial outside a grid, planned like a grid's: sized by the solver when ``budget`` is
    given, else at the config's own knob value (then the budget does not apply)."""
    from peftbench.results.records import TrainingSpec

    found = registry.method(method)
    cfg = found.config(method_config or {})
    training = training or TrainingSpec()
    task_obj = task_for(task, registry)
    raw_data(task_obj, task, training)
    spec = spec_for(backbone, task=backbone_task_kind(task_obj), num_labels=max(task_obj.num_labels, 1),
                    registry=registry)
    return _trial(suite, task, task_obj, backbone, spec, found, cfg, learning_rate(found, lr, declared_lrs(registry)),
                  budget, solve(found, cfg, spec, budget), seed, training, role)


# -- names -----------------------------------------------------------------------------------
def declared_lrs(registry) -> dict[str, float]:
    """Each method's declared ``schedule_lr`` (tuned for the default schedule), where it has one."""
    return {n: e.obj.schedule_lr for n, e in registry.methods.items() if getattr(e.obj, "schedule_lr", None)}


def finish_suite(suite: SuiteConfig, registry, name: bool = True) -> SuiteConfig:
    """Methods as canonical entries (``adapter`` and ``houlsby`` are one suite), the learning rates
    (each method's declared ``schedule_lr`` unless the suite sets one) and a suite name; once."""
    if suite._finished:
        return suite
    all_methods = suite.methods is None
    suite.methods = suite.method_entries(registry, suite._notes)
    suite.budgets = suite.unique_budgets(suite._notes)
    lrs = declared_lrs(registry)
    for key, value in suite.training.lr.items():  # the suite's entries win over the declared ones
        try:
            lrs[registry.canonical(key)] = value
        except ConfigError as exc:
            raise ConfigError(f"field 'training.lr.{key}': {exc}") from None
    suite.training.lr = lrs
    if suite.suite is None and name:
        suite.suite = suite_name(suite, registry, all_methods)
    suite._finished = name or suite.suite is not None
    return suite


def _slug(text: str) -> str:
    text = text.replace("%", "pct")
    if text.startswith("file:"):
        text = Path(text[5:]).stem
    elif "/" in text and Path(text).expanduser().exists():  # a local model folder
        text = Path(text).name
    return re.sub(r"[^A-Za-z0-9._+]+", "_", text).strip("_") or "x"


def suite_name(suite: SuiteConfig, registry, all_methods: bool = False) -> str:
    """``default`` for the default grid, else a readable name from the grid's axes."""
    from peftbench.running.config import MethodEntry

    default = finish_suite(SuiteConfig(methods=[MethodEntry(name=n) for n in default_methods(registry)]), registry,
                           name=False)
    if suite.hash() == default.hash():
        return "default"
    methods = "all" if all_methods else "+".join(e.name for e in suite.method_entries(registry))
    parts = ["+".join(_slug(t.name) for t in suite.tasks), "+".join(_slug(b) for b in suite.backbones),
             _slug(methods), "+".join(_slug(b) for b in suite.budgets)]
    search = getattr(suite, "search", None)
    if search is not None and search.trials:  # searched finals are other trials: another folder
        parts.append(f"search{search.trials}")
    name = "-".join(parts)
    if len(name) > 80:
        name = f"{name[:63]}-{suite.hash()[:16]}"
    return name


def print_plan(plan: Plan, done: set[str] | None = None) -> None:
    done = done or set()
    for (task, backbone), spec in plan.specs.items():
        print(f"task {task}, backbone {backbone} ({spec.model_type}, {spec.layers} layers, d={spec.hidden}): "
              f"{spec.base_params:,} parameters without the task head ({spec.head_params:,} in the head)")
    print("budget: a method's trainable parameters / backbone parameters (task head excluded)\n")
    rows, seen = [], {}
    for t in plan.trials:
        key = (t.task.name, t.backbone, t.display, t.budget)  # a method listed twice: one row per variant
        if key in seen:
            seen[key][-1] += 1
            continue
        status = "run" if t.matched else "pinned, unmatched" if t.pinned else "nearest size"
        knob = f"{t.knob}={t.knob_value}" if t.knob else "—"
        rows.append([t.task.name, t.backbone, t.budget or "—", t.display, knob, f"{t.trainable_params:,}",
                     f"{t.achieved_pct:.3f}%", f"{t.lr:g}", status, 1])
        seen[key] = rows[-1]
    print("\n".join(table(["task", "backbone", "budget", "method", "knob", "trainable", "achieved", "lr", "status",
                           "seeds"], [[str(c) for c in row] for row in rows])))
    notes = dict.fromkeys(f"{t.method} at {t.budget}: {t.note}" for t in plan.trials
                          if t.seed == plan.suite.seed_list()[0] and t.note and t.budget)
    for note in notes:  # once, however many variants share it
        print(f"\n{note}")
    n_done = sum(1 for t in plan.trials if t.trial_id in done)
    unmatched = sum(1 for t in plan.trials if not t.matched)
    print(f"\nsuite {plan.name}: {len(plan.trials)} trials ({n_done} already done, {len(plan.trials) - n_done} to run), "
          f"{unmatched} not budget-matched (trained at their nearest or pinned size, ranked apart); "
          f"seeds {plan.suite.seed_list()}")
