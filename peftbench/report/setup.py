"""The report's Setup section: what ran, how the budget is defined, how the statistics work.

A reader should be able to judge every number below it from this section alone: the exact
command, the tasks with their primary metric and direction, the backbones with their size
(the budget's denominator), the methods, budgets and seeds, which split selected checkpoints
and search values and which one the test metrics come from (``TrialResult.splits``), the
training setup of each task and backbone (``training``), the statistical procedure, how many
trials ended how, the software and hardware they ran on, and how busy the machine was (``load``).
"""

from __future__ import annotations

import json
import shlex
from collections import Counter

import peftbench.report.stats as stats
from peftbench.report.context import ReportContext, Section
from peftbench.report.format import NOT_SOLVED, OFF_BUDGET
from peftbench.report.groups import budget_order
from peftbench.report.load import setup_line as load_line
from peftbench.report.training import training_lines
from peftbench.results.records import TrialRecord

BUDGET_DEFINITION = (
    "a method's trainable parameters during training divided by the backbone's parameters "
    "without the task head. The task head is trained by every method and is shown in its own "
    "column (Head), never counted in the budget."
)
SOLVING = (
    "Each budgeted method's size knob is solved so that its trainable parameters come as close to the target as "
    "the knob allows. In the tables, Achieved = trainable / backbone parameters, Δ target = (trainable − target) / "
    f"target; {OFF_BUDGET} marks a method more than one knob step away from the target, {NOT_SOLVED} a baseline the "
    "budget does not apply to."
)
STATISTICS = (
    "mean ± sample standard deviation over seeds; 95% CI = mean ± t(0.975, n−1)·s/√n (Student's t). Significance: "
    "two-sided Welch's t-test (unequal variances) of each method's seeds against the best budget-matched method's "
    "seeds in the same table (baselines outside the budget, marked `ref` in the Rank column, are compared with it "
    f"but not ranked), level α = {stats.ALPHA}, no correction for multiple comparisons. `*` = differs from the best, "
    "`n.s.` = not significant, `—` = fewer than 2 seeds on a side."
)
CONFIG_COLUMNS = "Per-trial resolved configurations are in `results.sqlite` (columns `method_config`, `lr`, `training`)."


def setup_section(ctx: ReportContext) -> Section:
    finals = ctx.finals
    lines = ["Command that produced these results:", "", "```sh",
             command_text(ctx.info) or "(not recorded: suite.json missing)", "```", ""]
    lines += [
        f"- **Tasks:** {_tasks(ctx) or '—'}",
        f"- **Backbones:** {_backbones(finals) or '—'}",
        f"- **Methods:** {', '.join(sorted({r.spec.display for r in finals})) or '—'}",
        f"- **Budgets:** {_budgets(ctx) or '—'}",
        f"- **Budget definition:** {BUDGET_DEFINITION} {SOLVING}",
        f"- **Seeds:** {_seeds(finals)}",
        *_splits(ctx),
        *training_lines(ctx.by_task_backbone(), finals),
        f"- **Statistics:** {STATISTICS}",
        f"- **Trials:** {_trials(finals)}",
    ]
    lines += _starts(finals)
    if ctx.searches:
        lines.append(f"- **Search trials:** {_trials(ctx.searches)}; selected on validation, not in the tables")
        reused = sum(1 for r in finals if r.result is not None and r.result.environment.get("reused_search_trial"))
        if reused:
            lines.append(f"- **Reused:** {reused} final trials are their selected search trial (the same seed, values "
                         f"and schedule, not pruned): trained once, then evaluated on test; the others trained anew")
    if ctx.info.get("hash"):
        lines.append(f"- **Suite hash:** `{ctx.info['hash']}`")
    lines += _environments(finals) + load_line(finals)
    lines += ["", CONFIG_COLUMNS]
    return Section("\n".join(lines), title="Setup", key="setup")


def _starts(records: list[TrialRecord]) -> list[str]:
    """Two-stage training: which rows started from a trained adapter, and from which (per seed)."""
    rows: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: (r.spec.display, r.spec.seed)):
        if r.spec.init_from:
            head = "adapter and task head" if r.spec.init_from.get("task_head") else "adapter; task head fresh"
            rows.setdefault(r.spec.display, []).append(f"seed {r.spec.seed} from {r.spec.init_from['source']} "
                                                       f"({head})")
    if not rows:
        return []
    return ["- **Two-stage training** (each trial started from a trained adapter of the same method and size, then "
            "trained under this suite's schedule): " + "; ".join(f"{name}: {', '.join(items)}"
                                                                  for name, items in rows.items())]


def command_text(info: dict) -> str | None:
    """The command recorded in ``suite.json``, shell-quoted when it was stored as a list."""
    cmd = info.get("command")
    if isinstance(cmd, list):
        return shlex.join(str(c) for c in cmd)
    return cmd


def _tasks(ctx: ReportContext) -> str:
    tasks = sorted({(g.task, g.primary, g.direction) for g in ctx.groups})
    return "; ".join(f"{t} (primary metric {p}, {'higher' if d == 'max' else 'lower'} is better)" for t, p, d in tasks)


def _backbones(records: list[TrialRecord]) -> str:
    """Each backbone with its size without the task head (the budget's denominator)."""
    sizes: dict[str, int] = {}
    for r in records:
        if r.spec.base_params:
            sizes.setdefault(r.spec.backbone, r.spec.base_params)
    return "; ".join(f"{b} ({sizes[b]:,} parameters without the task head)" if b in sizes else b
                     for b in sorted({r.spec.backbone for r in records}))


def _budgets(ctx: ReportContext) -> str:
    specs = [r.spec for r in ctx.finals]
    return ", ".join(sorted({g.budget for g in ctx.groups if g.budget}, key=lambda b: budget_order(specs, b)))


def _seeds(records: list[TrialRecord]) -> str:
    seeds = sorted({r.spec.seed for r in records})
    if not seeds:
        return "none recorded"
    return (f"{len(seeds)} ({', '.join(map(str, seeds))}) per method and budget; the Seeds column "
            "counts those that finished")


#: the splits in the order the Setup names them (others follow by name)
SPLIT_ORDER = ("validation", "test")


def _splits(ctx: ReportContext) -> list[str]:
    """Which split selected what and which one was read for the test metrics, per task, from the trials' records.

    A record says ``"<role>: <origin>"`` per split; roles over trials are merged (a role that begins
    another, 'selects checkpoints' in 'selects checkpoints and search values', is dropped).
    """
    tasks: dict[str, dict[str, dict[str, list[str]]]] = {g.task: {} for g in ctx.groups}
    for r in ctx.records:
        for split, text in (r.result.splits.items() if r.result is not None else ()):
            role, sep, origin = text.partition(": ")
            role, origin = (role.strip(), origin.strip()) if sep else ("", text.strip())
            roles = tasks.setdefault(r.spec.task.name, {}).setdefault(split, {}).setdefault(origin, [])
            role = role.replace("by this final trial", "by final trials")
            if role and role not in roles:
                roles.append(role)
    texts = {task: _split_text(found) for task, found in sorted(tasks.items())}
    if len(texts) <= 1:
        return [f"- **Splits:** {text}" for text in texts.values()]
    return ["- **Splits:**"] + [f"  - {task}: {text}" for task, text in texts.items()]


def _split_text(found: dict[str, dict[str, list[str]]]) -> str:
    if not found:
        return "not recorded (trials stored before the splits' origins were recorded)"
    parts = []
    for split in sorted(found, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)):
        for origin, roles in found[split].items():
            kept = [r for r in roles if not any(o != r and o.startswith(r) for o in roles)]
            parts.append(f"{split}: {origin or 'origin not recorded'}" + (f" — {', '.join(kept)}" if kept else ""))
    return "; ".join(parts)


def _trials(records: list[TrialRecord]) -> str:
    """'33 (24 done, 9 unreachable)': how many trials, by status."""
    statuses = Counter(r.status for r in records)
    return f"{len(records)}" + (f" ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})" if records else "")


def _environments(records: list[TrialRecord]) -> list[str]:
    """The finished trials' environment: one line, or one line per distinct environment."""
    envs = Counter(json.dumps(r.result.environment, sort_keys=True) for r in records
                   if r.status == "done" and r.result is not None and r.result.environment)
    if len(envs) == 1:
        return [f"- **Environment:** {_env_text(json.loads(next(iter(envs))))}"]
    if not envs:
        return []
    lines = [f"- **Environments:** the finished trials ran in {len(envs)} different environments:"]
    for text, n in sorted(envs.items(), key=lambda x: (-x[1], x[0])):
        lines.append(f"  - {n} trial(s): {_env_text(json.loads(text))}")
    return lines


def _env_text(env: dict) -> str:
    """'torch 2.13.0, transformers 5.24.0; device: cpu; threads: 2': versions first, then the rest by key."""
    parts = []
    versions = env.get("versions")
    if isinstance(versions, dict):
        parts.append(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    for key in sorted(k for k in env if k != "versions"):
        value = env[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in sorted(value.items()))
        parts.append(f"{key}: {value}")
    return "; ".join(parts)
