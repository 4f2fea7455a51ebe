"""The search rounds of a run, then the final trials at the values selected on validation.

Every (task, backbone, method, budget) group of the plan gets ``search.trials`` search trials
(role ``search``, ``search_index`` 0..N-1, seeded like the group's first final seed), run in
rounds: each round asks one trial per group, so the groups run side by side through the
executor. The store is the search's memory, so a rerun (or a run after ``kill -9``) trains
nothing twice and loses nothing: for each (group, index) it looks in the store first:

- finished (``done``, or ``diverged``: the same values diverge again): nothing runs; the trial
  is told to the study when a later index is asked;
- unfinished (``running`` after a kill, ``failed``): run again with its STORED spec (the
  values it was asked with);
- missing: asked from Optuna (``search.ask``) with the group's earlier trials told to the study.

Several processes on one suite cooperate through their claims: a group's next index is asked
only once every earlier one is settled, so each process asks Optuna the same values (the
same trial id, which one process claims); a trial another process holds is waited for.

Selection reads validation only: per group, the done search trial with the best
``val_metrics[primary_metric]`` (a pruned one counts with its best value so far; ties go to
the lower index). The final seeds are then planned at the selected values, carrying them in
``search_params`` and the space in ``search_space``, so their ids name what they train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from pydantic import ValidationError

from peftbench.contract.method import format_validation_error
from peftbench.errors import ConfigError, PeftbenchError
from peftbench.report.format import table
from peftbench.results.records import TrialRecord, TrialSpec
from peftbench.running.executors import Job
from peftbench.running.plan import Plan, with_values
from peftbench.running.reuse import reusable
from peftbench.running.search import (Choice, Param, PastTrial, Pruning, SearchConfig, ask, check_space,
                                      describe_space, method_space, space_json)

#: search trials a rerun does not run again
FINISHED = ("done", "diverged")

GroupKey = tuple  # (task, backbone, method, budget)


def group_key(spec: TrialSpec) -> GroupKey:
    """(task, backbone, method, budget, variant): the variant tells apart two configs of one method."""
    return (spec.task.name, spec.backbone, spec.method, spec.budget, spec.variant)


@dataclass
class Group:
    key: GroupKey
    finals: list[TrialSpec]  # the planner's seeds, in order
    space: dict[str, Param]  # empty: no declared parameter applies to this method

    @property
    def template(self) -> TrialSpec:
        return self.finals[0]

    @property
    def label(self) -> str:
        return f"{self.template.display} {self.key[3] or '(no budget)'}"


def _value(record: TrialRecord | None) -> float | None:
    """A done trial's validation value of its primary metric (None: none, or not finite)."""
    if record is None or record.status != "done" or record.result is None:
        return None
    value = record.result.val_metrics.get(record.spec.primary_metric)
    return float(value) if value is not None and math.isfinite(value) else None


def past_trial(record: TrialRecord) -> PastTrial:
    """A stored search trial as its study is told it: complete, pruned (with its value), or failed."""
    value = _value(record)
    curves = record.result.curves if record.result is not None else []
    intermediate = {c.step: float(c.val_metric) for c in curves if c.val_metric is not None and math.isfinite(c.val_metric)}
    if value is None:
        return PastTrial(params=record.spec.search_params, state="fail", intermediate=intermediate)
    state = "pruned" if record.result.pruned else "complete"
    return PastTrial(params=record.spec.search_params, state=state, value=value, intermediate=intermediate)


def _rank(record: TrialRecord) -> tuple:
    order = {"done": 3, "diverged": 2, "failed": 1, "running": 0}
    return order.get(record.status, -1), record.started_at or ""


class SearchRounds:
    """The search of one run: its groups, what the store already holds, the rounds, the selection."""

    def __init__(self, plan: Plan, store, registry, config: SearchConfig, root: str):
        self.plan, self.store, self.registry, self.config, self.root = plan, store, registry, config, root
        methods = {t.method: registry.method(t.method) for t in plan.trials}
        check_space(config, list(methods.values()))
        spaces = {name: method_space(config, method) for name, method in methods.items()}
        grouped: dict[GroupKey, list[TrialSpec]] = {}
        for spec in plan.trials:
            grouped.setdefault(group_key(spec), []).append(spec)
        self.groups = [Group(key, sorted(finals, key=lambda s: s.seed), spaces[key[2]])
                       for key, finals in grouped.items()]
        for group in self.groups:
            self._check_values(group)
            points = math.prod(len(p.values) for p in group.space.values()) if config.sampler == "grid" else 0
            if group.space and points and points < config.trials:  # the grid would repeat a point
                raise ConfigError(f"field 'search': the grid of {group.label} ({describe_space(group.space)}) has "
                                  f"{points} point(s), fewer than the {config.trials} search trials asked for; "
                                  f"give --search-trials {points} or more values")
        self.found: dict[tuple[GroupKey, int], TrialRecord] = {}
        self.reuse: dict[str, TrialRecord] = {}  # set by finals()
        self.refresh()

    def refresh(self) -> None:
        """Each (group, index)'s search trial as the store holds it now (other processes write there too)."""
        for record in (self.store.records(self.plan.name) if self.store is not None else []):
            if record.spec.role == "search" and record.spec.search_index is not None:
                key = (group_key(record.spec), record.spec.search_index)
                old = self.found.get(key)
                if old is None or old.trial_id == record.trial_id or _rank(record) > _rank(old):
                    self.found[key] = record

    def _check_values(self, group: Group) -> None:
        """Each declared value fits the group's trial (a training field's limits, a method field's)."""
        for name, param in group.space.items():
            for value in (param.values if isinstance(param, Choice) else (param.low, param.high)):
                try:
                    with_values(self.plan, group.template, {name: value}, self.registry)
                except ValidationError as exc:
                    raise ConfigError(format_validation_error(f"search.space.{name}={value}: ", exc)) from None
                except PeftbenchError as exc:
                    raise ConfigError(f"search.space.{name}={value} does not fit {group.label}: {exc}") from None

    # -- counts ------------------------------------------------------------------------------
    @property
    def searched(self) -> list[Group]:
        return [g for g in self.groups if g.space]

    @property
    def total(self) -> int:
        return self.config.trials * len(self.searched)

    def finished(self) -> int:
        return sum(1 for g in self.searched for i in range(self.config.trials)
                   if (r := self.found.get((g.key, i))) is not None and r.status in FINISHED)

    # -- rounds ------------------------------------------------------------------------------
    def _past(self, group: Group, index: int) -> list[PastTrial]:
        return [past_trial(self.found[(group.key, j)]) for j in range(index) if (group.key, j) in self.found]

    def search_spec(self, group: Group, index: int, values: dict) -> TrialSpec:
        return with_values(self.plan, group.template, values, self.registry, role="search", search_index=index,
                           search_params=values, search_space=space_json(group.space))

    def job(self, group: Group, index: int) -> Job | None:
        """The round-``index`` job of ``group``: None when finished, its stored spec when unfinished, else asked."""
        record = self.found.get((group.key, index))
        if record is not None and record.status in FINISHED:
            return None
        past = self._past(group, index)
        if record is not None:
            spec = record.spec
        else:
            spec = self.search_spec(group, index, ask(self.config, group.space, group.template.direction, past))
        pruning = None if self.config.pruner == "none" else Pruning(
            direction=spec.direction, pruner=self.config.pruner, startup_trials=self.config.startup_trials,
            warmup_steps=self.config.warmup_steps, space=spec.search_space, number=len(past), past=past)
        return Job(spec, f"{self.root}/{spec.trial_id}", pruning)

    def run(self, run_jobs: Callable[[list[Job]], list[Job]], wait: Callable[[list[Job]], None], since: str) -> None:
        """Rounds until each group's N search trials are settled (done, diverged, or failed at or after
        ``since``, when this run began): a round runs, per group, its first index not settled yet, so
        its study is told every earlier trial and any process on this suite asks Optuna the same
        values. ``run_jobs`` runs a round and returns the jobs another live process holds; when that
        is every job of a round, ``wait(held)`` sleeps before the store is looked at again."""
        def settled(record: TrialRecord | None) -> bool:
            return record is not None and (record.status in FINISHED or
                                           (record.status == "failed" and (record.finished_at or "") >= since))

        while True:
            self.refresh()
            jobs = []
            for group in self.searched:
                index = next((i for i in range(self.config.trials) if not settled(self.found.get((group.key, i)))), None)
                if index is not None:
                    jobs.append(self.job(group, index))
            if not jobs:
                return
            held = run_jobs(jobs)
            if len(held) == len(jobs):
                wait(held)

    # -- selection -----------------------------------------------------------------------------
    def best(self, group: Group) -> TrialRecord | None:
        """The group's done search trial with the best validation value (ties: the lower index)."""
        scored = [(v, i, r) for i in range(self.config.trials)
                  if (v := _value(r := self.found.get((group.key, i)))) is not None]
        if not scored:
            return None
        sign = 1 if group.template.direction == "max" else -1
        return max(scored, key=lambda s: (sign * s[0], -s[1]))[2]

    def finals(self) -> tuple[Plan, list[str]]:
        """The plan with each group's final seeds at its selected values; lines for groups with no selection.
        A final trial that its selected search trial already trained (same seed, values and schedule,
        not pruned) is noted in ``reuse`` (final trial id -> that search record): it is evaluated, not
        trained again (``running.reuse``)."""
        selected, waiting = {}, []
        for group in self.searched:
            best = self.best(group)
            selected[group.key] = None if best is None else best.spec.search_params
            if best is None:
                waiting.append(f"{group.label}: no search trial finished with a validation "
                               f"{group.template.primary_metric}; its {len(group.finals)} final trial(s) wait "
                               f"(rerun the same command to retry the failed ones)")
        spaces = {group.key: group.space for group in self.searched}
        best = {group.key: self.best(group) for group in self.searched}
        trials = []
        for spec in self.plan.trials:
            key = group_key(spec)
            if key not in spaces:
                trials.append(spec)  # nothing declared applies to its method: planned values
            elif selected[key] is not None:
                values = selected[key]
                final = with_values(self.plan, spec, values, self.registry, search_params=values,
                                    search_space=space_json(spaces[key]))
                if reusable(final, best[key]):
                    self.reuse[final.trial_id] = best[key]
                trials.append(final)
        return replace(self.plan, trials=trials), waiting

    # -- dry run -------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        config = self.config
        first = self.groups[0].template if self.groups else None
        metric = f"validation {first.primary_metric} ({first.direction})" if first else "validation"
        lines = [f"search: {config.trials} trial(s) per group x {len(self.searched)} group(s) = {self.total} search "
                 f"trials ({self.finished()} already done), then the final seeds at the values selected on "
                 f"{metric}; {config.describe()}"]
        rows = [[*(str(k) if k is not None else "—" for k in g.key[:2]), g.template.display, g.key[3] or "—",
                 str(config.trials if g.space else 0),
                 describe_space(g.space) or "nothing declared applies: finals at the planned values"]
                for g in self.groups]
        lines += table(["task", "backbone", "method", "budget", "search trials", "space"], rows)
        return lines

