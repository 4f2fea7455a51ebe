"""The grid: tasks x backbones x methods x budgets x seeds, each budget solved per method.

Budgeted methods get their knob from the solver on the backbone's spec; baselines (``full``,
``head``) run once per seed whatever the budgets. A trial's id is a hash of its resolved
config, so the same command names the same trials and a rerun can skip finished ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.budget import solve
from peftbench.running.config import RUN_ONLY, SuiteConfig, TaskEntry, canonical_json
from peftbench.errors import BudgetError, ConfigError


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Trial:
    """One cell of the grid: its store row identity and the payload an executor runs."""

    trial_id: str
    row: dict  # identity + planned sizes, as Store.start takes them
    payload: dict
    note: str = ""  # the solver's note for an unreachable budget

    @property
    def label(self) -> str:
        r = self.row
        short = lambda name: Path(name.removeprefix("file:")).name if "/" in name else name  # noqa: E731
        return f"{short(r['task'])} {short(r['backbone'])} {r['method']} {r['budget'] or '(no budget)'} seed {r['seed']}"


@dataclass
class Plan:
    suite: SuiteConfig
    name: str
    trials: list[Trial] = field(default_factory=list)  # runnable
    unreachable: list[Trial] = field(default_factory=list)
    specs: dict = field(default_factory=dict)  # (task, backbone) -> BackboneSpec


def trial_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _knob_step(method, cfg, spec, value: int, high: int | None) -> int | None:
    """Parameters one knob step adds at the solved value (the budget's granularity)."""
    if value is None or high is None:
        return None
    count = lambda k: method.param_count(method.with_knob(cfg, k), spec)  # noqa: E731
    return count(value + 1) - count(value) if value < high else count(value) - count(value - 1) if value > 1 else None


def make_plan(suite: SuiteConfig, registry) -> Plan:
    """Every trial of the grid, budgets solved; raises before training on a budget nobody reaches."""
    from peftbench.backbones.backbone import spec_for
    from peftbench.running.trial import backbone_task_kind, raw_data, task_for

    suite = finish_suite(suite.model_copy(deep=True), registry)
    entries = suite.method_entries(registry)
    lrs = suite.training.lr
    methods = []
    for i, entry in enumerate(entries):
        method = registry.method(entry.name)
        if method.budgeted and method.knob and method.knob in entry.config:
            raise ConfigError(f"field 'methods.{i}.config.{method.knob}': {method.knob!r} is {method.name}'s size knob, "
                              "set by the budget solver from the budgets; remove it (or choose the size with a budget)")
        cfg = method.config(entry.config)
        lr = entry.lr or lrs.get(method.name) or method.default_lr
        methods.append((method, cfg, lr))
    training = suite.training.model_dump(mode="json", exclude={"lr", *RUN_ONLY})
    plan = Plan(suite=suite, name=suite.suite)
    seeds = suite.seed_list()
    for task_entry in suite.tasks:
        task = task_for(task_entry)
        raw_data(task, task_entry, suite.training)  # checks columns and labels now, not mid-grid
        for backbone in suite.backbones:
            spec = spec_for(backbone, task=backbone_task_kind(task), num_labels=max(task.num_labels, 1), registry=registry)
            plan.specs[(task_entry.name, backbone)] = spec
            solved = _solve_all(methods, spec, suite.budgets, backbone)
            for seed in seeds:
                for method, cfg, lr, budget, sol in solved:
                    trial = _trial(plan.name, task_entry, task, backbone, spec, method, cfg, lr, budget, sol, seed, training)
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
           budget: str | None, sol, seed: int, training: dict) -> Trial:
    cfg = method.with_knob(cfg, sol.value) if (budget and sol.value is not None) else cfg
    config = {
        "task": task_entry.model_dump(mode="json"),
        "backbone": backbone,
        "method": method.name,
        "method_config": cfg.model_dump(mode="json"),
        "budget": budget,
        "seed": seed,
        "lr": lr,
        "training": training,
    }
    digest = trial_hash(config)
    trial_id = digest[:16]
    row = {
        "trial_id": trial_id, "suite": suite_name_, "task": task_entry.name, "backbone": backbone,
        "method": method.name, "budget": budget, "seed": seed, "knob": method.knob,
        "knob_value": method.knob_value(cfg) if method.knob else None,
        "knob_step": _knob_step(method, cfg, spec, sol.value, sol.knob_high) if budget else None,
        "config": config, "config_hash": digest,
        "primary_metric": task.primary_metric, "direction": task.direction,
        "trainable_params": sol.params, "head_params": spec.head_params, "base_params": spec.base_params,
        "achieved_pct": 100 * sol.params / spec.base_params, "target_params": sol.target,
        "stored_params": sol.stored,
    }
    return Trial(trial_id, row, payload={**config, "trial_id": trial_id}, note=sol.note)


# -- names -----------------------------------------------------------------------------------
def finish_suite(suite: SuiteConfig, registry) -> SuiteConfig:
    """Methods as canonical entries (``adapter`` and ``houlsby`` are one suite) and a suite name."""
    all_methods = suite.methods is None
    suite.methods = suite.method_entries(registry)
    lrs = {}
    for key, value in suite.training.lr.items():  # defaults come first, so a later (user) entry wins
        try:
            lrs[registry.canonical(key)] = value
        except ConfigError as exc:
            raise ConfigError(f"field 'training.lr.{key}': {exc}") from None
    suite.training.lr = lrs
    if suite.suite is None:
        suite.suite = suite_name(suite, registry, all_methods)
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
    from peftbench.running.config import MethodEntry, builtin_methods

    default = SuiteConfig(methods=[MethodEntry(name=n) for n in builtin_methods(registry)])
    if suite.hash() == default.hash():
        return "default"
    methods = "all" if all_methods else "+".join(e.name for e in suite.method_entries(registry))
    parts = ["+".join(_slug(t.name) for t in suite.tasks), "+".join(_slug(b) for b in suite.backbones),
             _slug(methods), "+".join(_slug(b) for b in suite.budgets)]
    name = "-".join(parts)
    if len(name) > 80:
        name = f"{name[:63]}-{suite.hash()[:16]}"
    return name


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def print_plan(plan: Plan, done: set[str] | None = None) -> None:
    done = done or set()
    for (task, backbone), spec in plan.specs.items():
        print(f"task {task}, backbone {backbone} ({spec.model_type}, {spec.layers} layers, d={spec.hidden}): "
              f"{spec.base_params:,} parameters without the task head ({spec.head_params:,} in the head)")
    print("budget: a method's trainable parameters / backbone parameters (task head excluded)\n")
    rows, seen = [], {}
    for t in plan.trials + plan.unreachable:
        r = t.row
        key = (r["task"], r["backbone"], r["method"], r["budget"])
        if key in seen:
            seen[key][-1] += 1
            continue
        status = "unreachable" if t in plan.unreachable else "run"
        knob = f"{r['knob']}={r['knob_value']}" if r["knob"] else "—"
        rows.append([r["task"], r["backbone"], r["budget"] or "—", r["method"], knob, f"{r['trainable_params']:,}",
                     f"{r['achieved_pct']:.3f}%", f"{t.payload['lr']:g}", status, 1])
        seen[key] = rows[-1]
    print(_table(["task", "backbone", "budget", "method", "knob", "trainable", "achieved", "lr", "status", "seeds"],
                 [[str(c) for c in row] for row in rows]))
    for t in plan.unreachable:
        if t.row["seed"] == plan.suite.seed_list()[0]:
            print(f"\n{t.row['method']} at {t.row['budget']}: {t.note}")
    n_done = sum(1 for t in plan.trials if t.trial_id in done)
    print(f"\nsuite {plan.name}: {len(plan.trials)} trials ({n_done} already done, {len(plan.trials) - n_done} to run), "
          f"{len(plan.unreachable)} unreachable; seeds {plan.suite.seed_list()}")
