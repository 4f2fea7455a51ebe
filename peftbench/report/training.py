"""The Setup's training lines: the schedule each (task, backbone) actually trained under.

Read from the final trials' ``TrainingSpec`` (what was planned) and their results (what
happened: examples used, planned and trained steps, the validation cadence). A setting that
differs between methods (a searched one) is shown with its most common value and the others by
method. Each method's learning rate is the LR column of its costs table; here only where it came
from (a search on validation, or fixed before training).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from peftbench.report.groups import Group
from peftbench.results.records import TrialRecord


def training_lines(groups_by_task_backbone: dict[tuple[str, str], list[Group]],
                   records: list[TrialRecord]) -> list[str]:
    """'- **Training:** ...' (one task and backbone) or one sub-item per (task, backbone)."""
    texts = {}
    for task, backbone in groups_by_task_backbone:
        mine = [r for r in records if r.spec.role == "final" and r.spec.task.name == task
                and r.spec.backbone == backbone and r.status != "unreachable"]
        if mine:
            texts[f"{task} on {backbone}"] = training_text(mine)
    if len(texts) <= 1:
        return [f"- **Training:** {text}" for text in texts.values()]
    return ["- **Training:**"] + [f"  - {where}: {text}" for where, text in texts.items()]


def training_text(records: list[TrialRecord]) -> str:
    """One (task, backbone)'s training setup, in the order a reader follows a trial."""
    done = [r for r in records if r.status == "done" and r.result is not None]
    parts = [_examples(records, done), _schedule(records, done), _batches(records), _validation(records, done),
             _optimizer(records), _lengths(records), _learning_rate(records)]
    return "; ".join(p for p in parts if p)


# -- helpers -------------------------------------------------------------------------------
def by_method(records: list[TrialRecord], value_of: Callable[[TrialRecord], str]) -> str:
    """A setting's text: one value, or the most common one with the others by method."""
    methods: dict[str, list[str]] = {}
    for r in records:
        names = methods.setdefault(value_of(r), [])
        if r.spec.display not in names:
            names.append(r.spec.display)
    if len(methods) == 1:
        return next(iter(methods))
    counts = Counter(value_of(r) for r in records)
    common = max(methods, key=lambda v: (counts[v], v))
    others = "; ".join(f"{', '.join(sorted(names))}: {value}" for value, names in sorted(methods.items())
                       if value != common)
    return f"{common} ({others})"


def span(values: list[int]) -> str:
    """'50' or '40–50'."""
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _recorded(done: list[TrialRecord], split: str) -> list[int]:
    return [r.result.examples[split] for r in done if split in r.result.examples]


# -- the parts -----------------------------------------------------------------------------
def _examples(records: list[TrialRecord], done: list[TrialRecord]) -> str:
    """'examples: train 800, validation 200, test 500 (seeded subsamples, data seed 0)'; a count a trial did
    not record is its limit: 'train ≤ 2,000 (...; counts used not recorded)'."""
    limits = {"train": "train_limit", "validation": "eval_limit", "test": "test_limit"}
    parts, unknown = [], False
    for split, limit in limits.items():
        counts = _recorded(done, split)
        if counts:
            parts.append(f"{split} {span(counts)}")
            continue
        unknown = True
        parts.append(f"{split} " + by_method(records, lambda r, limit=limit: f"≤ {getattr(r.spec.training, limit):,}"
                                             if getattr(r.spec.training, limit) else "all"))
    seeds = by_method(records, lambda r: str(r.spec.training.data_seed))
    limited = any(getattr(r.spec.training, limit) for r in records for limit in limits.values())
    how = (f"seeded subsamples up to train_limit, eval_limit and test_limit, data seed {seeds}" if limited
           else "the whole splits")
    return f"examples: {', '.join(parts)} ({how}{'; counts used not recorded' if unknown else ''})"


def _schedule(records: list[TrialRecord], done: list[TrialRecord]) -> str:
    """'1 epoch, capped at 320 steps: 50 planned steps, 40–50 trained'."""
    def plan(r: TrialRecord) -> str:
        t = r.spec.training
        if t.max_steps:
            return f"{t.max_steps:,} steps (max_steps)"
        epochs = f"{t.epochs:g} epoch{'' if t.epochs == 1 else 's'}"
        return epochs + (f", capped at {t.step_cap:,} steps" if t.step_cap else ", no step cap")

    text = by_method(records, plan)
    planned = [r.result.planned_steps for r in done if r.result.planned_steps is not None]
    trained = [r.result.steps for r in done if r.result.steps is not None]
    counts = ([f"{span(planned)} planned steps"] if planned else []) + ([f"{span(trained)} trained"] if trained else [])
    seen = {round(r.result.planned_steps * r.spec.training.batch_size * r.spec.training.grad_accum
                  / r.result.examples["train"], 2) for r in done
            if r.result.planned_steps and r.result.examples.get("train")}
    cut = any(r.spec.training.max_steps or r.spec.training.step_cap for r in done)
    if cut and len(seen) == 1:  # what a step count or cap amounts to in passes over the training examples
        counts[0] += f" ({next(iter(seen)):g} epochs of data)"
    return text + (": " + ", ".join(counts) if counts else "")


def _batches(records: list[TrialRecord]) -> str:
    def accumulated(r: TrialRecord) -> str:
        t = r.spec.training
        return f"{t.batch_size}" + (f" × {t.grad_accum} accumulated" if t.grad_accum > 1 else "")

    text = f"batch {by_method(records, accumulated)}, eval batch " + \
        by_method(records, lambda r: str(r.spec.training.eval_batch_size))
    if any(r.spec.training.gradient_checkpointing for r in records):
        text += ", gradient checkpointing " + by_method(
            records, lambda r: "on" if r.spec.training.gradient_checkpointing else "off")
    return text


def _validation(records: list[TrialRecord], done: list[TrialRecord]) -> str:
    """'validation every 25 steps, early stopping after 3 passes without improvement; the best step's weights kept'."""
    def every(r: TrialRecord) -> str:
        n = r.spec.training.eval_every
        if n:
            return f"validation every {n:,} steps"
        seen = [r2.result for r2 in done if r2.spec.display == r.spec.display]
        first = min((c.step for res in seen for c in res.curves if c.val_metric is not None), default=None)
        return f"validation every {first:,} steps (eval_every unset)" if first else "validation 4 times per trial"

    def patience(r: TrialRecord) -> str:
        p = r.spec.training.patience
        return f"early stopping after {p} passes without improvement" if p else "no early stopping"

    return f"{by_method(records, every)}, {by_method(records, patience)}; the best validation step's weights kept"


def _optimizer(records: list[TrialRecord]) -> str:
    t = lambda r: r.spec.training  # noqa: E731
    return (f"warmup {by_method(records, lambda r: f'{t(r).warmup_ratio:.0%}')} of the planned steps, weight decay "
            f"{by_method(records, lambda r: f'{t(r).weight_decay:g}')}, gradient norm clipped at "
            f"{by_method(records, lambda r: f'{t(r).max_grad_norm:g}')}")


def _lengths(records: list[TrialRecord]) -> str:
    text = f"max_length {by_method(records, lambda r: str(r.spec.training.max_length))} tokens"
    generating = [r for r in records if r.spec.task.kind == "generation"]
    if generating:
        text += f", up to {by_method(generating, lambda r: str(r.spec.training.max_new_tokens))} new tokens"
    precisions = [r for r in records if r.spec.training.precision != "auto"]
    if precisions:
        text += f", precision {by_method(records, lambda r: r.spec.training.precision)}"
    return text


def _learning_rate(records: list[TrialRecord]) -> str:
    """Where each method's learning rate came from (the values: the LR column of the costs tables)."""
    searched = sorted({r.spec.display for r in records if "lr" in r.spec.search_params})
    fixed = sorted({r.spec.display for r in records} - set(searched))
    parts = []
    if searched:
        parts.append(f"searched on validation{' for ' + ', '.join(searched) if fixed else ''} (see *Search*)")
    if fixed:
        parts.append(f"fixed before training{' for ' + ', '.join(fixed) if searched else ''} (the method entry's "
                     "or the suite's `training.lr`, else the method's declared rate)")
    return "learning rate " + "; ".join(parts) + ": the LR column of the costs tables"
