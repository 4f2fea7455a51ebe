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
from peftbench.budget import solve
from peftbench.report.format import table
from peftbench.errors import BudgetError, ConfigError
from peftbench.results.records import TrialSpec
from peftbench.running.config import SuiteConfig, default_methods
from peftbench.tasks.data import backbone_task_kind, raw_data, task_for
from peftbench.tasks.entry import TaskEntry


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Plan:
    suite: SuiteConfig
    name: str
    trials: list[TrialSpec] = field(default_factory=list)  # runnable
    unreachable: list[TrialSpec] = field(default_factory=list)
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
    for i, entry in enumerate(suite.methods):
        method = registry.method(entry.name)
        if method.budgeted and method.knob and method.knob in entry.config:
            raise ConfigError(f"field 'methods.{i}.config.{method.knob}': {method.knob!r} is {method.name}'s size knob, "
                              "set by the budget solver from the budgets; remove it (or choose the size with a budget)")
        methods.append((method, method.config(entry.config), learning_rate(method, entry.lr, suite.training.lr)))
    training = suite.training.spec()
    plan = Plan(suite=suite, name=suite.suite)
    for task_entry in suite.tasks:
        task = task_for(task_entry, registry)
        raw_data(task, task_entry, training)  # checks columns and labels now, not mid-grid
        for backbone in suite.backbones:
            spec = spec_for(backbone, task=backbone_task_kind(task), num_labels=max(task.num_labels, 1), registry=registry)
            plan.specs[(task_entry.name, backbone)] = spec
            solved = _solve_all(methods, spec, suite.budgets, backbone)
            for seed in suite.seed_list():
                for method, cfg, lr, budget, sol in solved:
                    trial = _trial(plan.name, task_entry, task, backbone, spec, method, cfg, lr, budget, sol, seed,
                                   training)
                    (plan.trials if sol.reachable else plan.unreachable).append(trial)
    return plan


def _solve_all(methods, spec, budgets: list[str], backbone: str) -> list[tuple]:
    """[(method, cfg, lr, budget or None, Solution)]: baselines once, budgeted methods per budget."""
    out = [(m, cfg, lr, None, solve(m, cfg, spec, None)) for m, cfg, lr in methods if not m.budgeted or m.knob is None]
    for budget in budgets:
        row = [(m, cfg, lr, budget, solve(m, cfg, spec, budget)) for m, cfg, lr in methods if m.budgeted and m.knob]
        if row and not any(sol.reachable for *_, sol in row):
            notes = "; ".join(f"{m.name}: {sol.note}" for m, *_, sol in row)
            raise BudgetError(f"budget {budget} ({row[0][-1].target:,} params of {spec.base_params:,} in {backbone}) "
                              f"is reachable by none of the selected methods: {notes}")
        out += row
    return out


def _trial(suite_name_: str, task_entry: TaskEntry, task, backbone: str, spec, method, cfg, lr: float,
           budget: str | None, sol, seed: int, training, role: str = "final") -> TrialSpec:
    cfg = method.with_knob(cfg, sol.value) if (budget and sol.value is not None) else cfg
    return TrialSpec(
        suite=suite_name_, role=role, task=task_entry, backbone=backbone, method=method.name,
        method_config=cfg.model_dump(mode="json"), budget=budget, seed=seed, lr=lr, training=training,
        primary_metric=task.primary_metric, direction=task.direction, knob=method.knob,
        knob_value=method.knob_value(cfg) if method.knob else None,
        knob_step=sol.step,
        target_params=sol.target, trainable_params=sol.params, stored_params=sol.stored,
        head_params=spec.head_params, base_params=spec.base_params, reference=getattr(method, "reference", None),
        reachable=sol.reachable, note=sol.note,
    )


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
    suite.methods = suite.method_entries(registry)
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
    for t in plan.trials + plan.unreachable:
        key = (t.task.name, t.backbone, t.method, t.budget)
        if key in seen:
            seen[key][-1] += 1
            continue
        status = "run" if t.reachable else "unreachable"
        knob = f"{t.knob}={t.knob_value}" if t.knob else "—"
        rows.append([t.task.name, t.backbone, t.budget or "—", t.method, knob, f"{t.trainable_params:,}",
                     f"{t.achieved_pct:.3f}%", f"{t.lr:g}", status, 1])
        seen[key] = rows[-1]
    print("\n".join(table(["task", "backbone", "budget", "method", "knob", "trainable", "achieved", "lr", "status",
                           "seeds"], [[str(c) for c in row] for row in rows])))
    for t in plan.unreachable:
        if t.seed == plan.suite.seed_list()[0]:
            print(f"\n{t.method} at {t.budget}: {t.note}")
    n_done = sum(1 for t in plan.trials if t.trial_id in done)
    print(f"\nsuite {plan.name}: {len(plan.trials)} trials ({n_done} already done, {len(plan.trials) - n_done} to run), "
          f"{len(plan.unreachable)} unreachable; seeds {plan.suite.seed_list()}")
