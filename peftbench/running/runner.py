"""``peftbench run``: plan the grid, run its trials through an executor, then write the report.

Every trial has one row in ``<out>/<suite>/results.sqlite``; a rerun skips finished rows, so
a killed run resumes and loses only the trial in flight. Several runs may share one suite
folder: each claims a trial right before running it (``running.claims``), leaves the ones
another live process holds to it, waits for them at the end (taking over any whose process
died), and rewrites the report once the grid is done. Only this driver writes the store:
an executor only runs trials (``local``: in this process, one at a time; ``ray``: one Ray task
per trial, anywhere on a cluster) and calls back here with each outcome.

Under ``torchrun``/``accelerate launch`` every rank runs the same trials in the same order
(rank 0 decides which are pending and broadcasts them); only rank 0 writes the suite folder,
the store, the artifacts and the report.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from peftbench.errors import ConfigError, PeftbenchError
from peftbench.results.store import ClaimLost, Store
from peftbench.running.artifacts import check_artifacts_dir, clear_artifacts
from peftbench.running.claims import Claims
from peftbench.running.config import SuiteConfig, merge, read_yaml, validate_suite
from peftbench.running.distributed import broadcast_from_main, init_distributed, rank_and_world
from peftbench.running.execute import Outcome, execute_trial
from peftbench.running.executors import Job, import_ray, make_executor
from peftbench.running.flags import (add_run_arguments, attach_negative_values, command_line, given,
                                     overrides_from_args, split_list)
from peftbench.running.options import RunOptions
from peftbench.running.plan import Plan, finish_suite, make_plan, print_plan
from peftbench.running.search import active_search
from peftbench.running.searching import SearchRounds
from peftbench.running.suite_dir import STORE_FILE, check_suite_dir, open_suite_dir
from peftbench.running.trackers import check_installed, prepare as prepare_trackers

__all__ = ["add_run_arguments", "main_run", "run_plan", "resolve_suite"]


# -- executing -------------------------------------------------------------------------------
def run_plan(plan: Plan, store: Store, suite_dir: Path, executor, quiet: bool = False, artifacts: str | None = None,
             announce: Callable[[list[str]], None] | None = None, registry=None, claims: Claims | None = None,
             ahead: bool = False) -> dict[str, int]:
    """Run the search (if the suite has one) and the final trials not finished yet; returns counts by status (``searched``: search trials done in this run; ``by others``: trials another process finished or holds).

    ``artifacts``: the folder or URL that holds one folder per trial (default: ``suite_dir/trials``);
    ``announce(pending_ids)`` is called once the pending final trials are known, before they run;
    ``registry``: the plugins' registry, which a search needs (its spaces and values are the methods');
    ``claims``: this process's claims on the store (default: its own for this call): a trial is claimed right
    before it runs, and one that another live process holds is left to it and waited for at the end;
    ``ahead``: claim the pending final trials before ``announce`` and wait for none (torchrun ranks follow one list).
    """
    if claims is None:
        with Claims(store) as own:
            return run_plan(plan, store, suite_dir, executor, quiet, artifacts, announce, registry, own, ahead)
    from tqdm.auto import tqdm

    root = artifacts.rstrip("/") if artifacts else str(suite_dir / "trials")
    counts = {"skipped": 0, "searched": 0, "done": 0, "failed": 0, "diverged": 0, "waiting": 0, "by others": 0}
    search = active_search(plan.suite)
    if search is not None and registry is None:
        raise ConfigError("a suite with a search needs the plugins' registry: run_plan(..., registry=...)")
    rounds = SearchRounds(plan, store, registry, search, root) if search is not None else None
    counts["skipped"] = rounds.finished() if rounds else 0
    bar = tqdm(total=len(plan.trials) + (rounds.total if rounds else 0), initial=counts["skipped"],
               desc=f"suite {plan.name}", position=0, disable=quiet, dynamic_ncols=True, unit="trial")
    held: list[Job] = []  # the jobs of the last run_jobs that another live process holds
    claimed: set[str] = set()  # claimed ahead

    def by_others() -> None:
        counts["by others"] += 1
        bar.update(1)

    def on_start(job: Job) -> bool:
        if job.trial_id not in claimed:
            state = claims.claim(job.spec)  # refuses a finished trial, so its folder is never cleared below
            if state == "held":
                held.append(job)
            elif state != "claimed":  # another process finished (or tried) it since the plan was made
                by_others()
            if state != "claimed":
                return False
        clear_artifacts(job.artifacts)  # leftovers of a killed or failed attempt
        bar.set_postfix_str(job.spec.label, refresh=True)
        return True

    def on_done(job: Job, outcome: Outcome) -> None:
        try:
            if outcome.status == "done":
                store.finish(job.trial_id, outcome.result, owner=claims.owner)
            else:
                store.fail(job.trial_id, outcome.status, outcome.error, outcome.result, owner=claims.owner)
        except ClaimLost as exc:
            bar.write(f"peftbench: {exc}", file=sys.stderr)
            by_others()
            return
        search_done = outcome.status == "done" and job.spec.role == "search"
        counts["searched" if search_done else outcome.status] += 1
        bar.update(1)
        if not quiet:
            bar.write(_line(job.spec, outcome))

    def run_jobs(jobs: list[Job]) -> list[Job]:
        """Run ``jobs``; the ones another live process holds come back, not run."""
        held.clear()
        executor.prepare(jobs)
        executor.run(jobs, on_start, on_done)
        return list(held)

    def wait(jobs: list[Job]) -> None:
        claims.wait([job.spec for job in jobs], lambda line: bar.write(line, file=sys.stderr))

    try:
        if rounds is not None:
            rounds.run(run_jobs, wait, claims.since)
            finals, waiting = rounds.finals()
            counts["waiting"] = len(plan.trials) - len(finals.trials)
            bar.total -= counts["waiting"]
            plan = finals
            for line in waiting:
                bar.write(f"peftbench: {line}", file=sys.stderr)
        pending, queued = [], set()
        for spec in plan.trials:
            if store.is_done(spec.trial_id):
                counts["skipped"] += 1
                bar.update(1)
            elif spec.trial_id not in queued:  # a trial listed twice runs once (its folder is cleared once, before)
                queued.add(spec.trial_id)
                pending.append(Job(spec, f"{root}/{spec.trial_id}",
                                   reuse=rounds.reuse.get(spec.trial_id) if rounds is not None else None))
        if ahead:
            claimed.update(job.trial_id for job in pending if claims.claim(job.spec) == "claimed")
            for _ in range(len(pending) - len(claimed)):
                by_others()
            pending = [job for job in pending if job.trial_id in claimed]
        executor.prepare(pending)
        if announce is not None:
            announce([job.trial_id for job in pending])
        others = run_jobs(pending)
        while others and not ahead:  # the grid is done when theirs are: wait, taking over any whose process died
            wait(others)
            others = run_jobs(others)
    finally:
        bar.close()
    return counts


def _line(spec, outcome: Outcome) -> str:
    """A finished trial in one line: its test metric (final) or validation value (search)."""
    if outcome.status != "done":
        return f"{spec.label}: {outcome.status.upper()}: {outcome.error}"
    result, metric = outcome.result, spec.primary_metric
    if spec.role == "search":
        value = result.val_metrics.get(metric)
        pruned = f" (pruned at step {result.steps})" if result.pruned else ""
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.search_params.items())
        return (f"{spec.label} #{spec.search_index} {shown}: validation {metric} "
                f"{'—' if value is None else f'{value:.4f}'}{pruned}")
    value = result.metrics.get(metric)
    return f"{spec.label}: {metric} {value:.4f}" if value is not None else spec.label


# -- the suite from YAML and flags ----------------------------------------------------------
def resolve_suite(args, registry) -> SuiteConfig:
    """YAML (if any) < flags; named tasks/methods keep their YAML details (columns, config, lr)."""
    base = read_yaml(args.config) if getattr(args, "config", None) else {}
    over = overrides_from_args(args)
    for key in ("tasks", "methods"):  # --methods lora keeps the YAML's {name: lora, config: ...}
        if key in over and isinstance(base.get(key), list):
            known = {}
            for item in base[key]:
                if isinstance(item, dict) and "name" in item:
                    known[_canonical(key, item["name"], registry)] = item
            over[key] = [known.get(_canonical(key, n, registry), n) for n in over[key]]
    if getattr(args, "text_column", None) or getattr(args, "label_column", None) or getattr(args, "drop_invalid", False):
        tasks = over.get("tasks", base.get("tasks"))
        named = [t if isinstance(t, str) else t.get("name", "") for t in tasks or []]
        if not any(n.startswith(("file:", "hub:")) for n in named):
            raise ConfigError("--text-column/--label-column/--drop-invalid apply to file:/hub: tasks; give one with "
                              f"--task file:PATH (this grid has {', '.join(named) or 'only the default task'})")
        columns = {"text_columns": split_list(args.text_column) or None, "label_column": args.label_column,
                   "drop_invalid": True if getattr(args, "drop_invalid", False) else None}
        columns = {k: v for k, v in columns.items() if v}
        over["tasks"] = [
            merge({"name": t} if isinstance(t, str) else t, columns)
            if (t if isinstance(t, str) else t.get("name", "")).startswith(("file:", "hub:")) else t
            for t in tasks
        ]
    return finish_suite(validate_suite(merge(base, over), getattr(args, "config", None)), registry)


def _canonical(key: str, name: str, registry) -> str:
    if key == "methods":
        try:
            return registry.canonical(name)
        except ConfigError:
            return name
    return name


def setup_process(suite: SuiteConfig, quiet: bool) -> RunOptions:
    """CPU threads, allocator, device pinning and library verbosity for a run; its run options."""
    import torch

    from peftbench.running.costs import cpu_count, tune_malloc

    tune_malloc()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun: ranks on this machine share its CPUs
    torch.set_num_threads(suite.training.threads or max(1, cpu_count() // local_world))
    device = suite.training.device
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ and suite.executor == "local":
        # pin one GPU before CUDA starts: the Trainer would otherwise use cuda:0 (or all of them)
        index = int(device.split(":")[1])
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and index >= len(visible):
            raise ConfigError(f"--device {device}: CUDA_VISIBLE_DEVICES lists only {len(visible)} device(s)")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
        device = "cuda"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return RunOptions.from_suite(suite, quiet, device=device)


def _registry(args):
    """The plugin registry, with ``peftbench --plugins-dir DIR run ...``'s folder loaded (built once, here)."""
    from peftbench.contract.registry import get_registry

    return get_registry(plugins_dir=getattr(args, "plugins_dir", None))


def check_run_options(args, suite: SuiteConfig, world: int) -> None:
    """Executor flags that cannot apply, and device choices that cannot work, as clear errors."""
    ray_flags = given(args, "ray.")
    if ray_flags and suite.executor != "ray":
        raise ConfigError(f"{', '.join(ray_flags)} apply to --executor ray; this run uses --executor {suite.executor}")
    device = suite.training.device
    if suite.executor == "ray" and device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with --executor ray: Ray assigns each trial its GPU(s); "
                          f"use --device cuda (or auto) with --gpus-per-trial N")
    if world > 1:
        if active_search(suite) is not None:
            raise ConfigError(f"this process is rank {rank_and_world()[0]} of {world} (torchrun/accelerate launch): "
                              f"a search (--search-trials) runs on one process; use --executor local or ray")
        if suite.executor != "local":
            raise ConfigError(f"this process is rank {rank_and_world()[0]} of {world} (torchrun/accelerate launch): "
                              f"one trial spans the ranks, so --executor must be local (not {suite.executor})")
        if device.startswith("cuda:"):
            raise ConfigError(f"--device {device} under torchrun/accelerate launch: each rank uses the GPU of its "
                              f"LOCAL_RANK; use --device cuda or auto")


def main_run(args) -> int:
    from peftbench.report import write_report
    from peftbench.running.device import resolve_device, resolve_precision

    registry = _registry(args)
    suite = resolve_suite(args, registry)
    quiet = bool(getattr(args, "quiet", False))
    rank, world = rank_and_world()
    check_run_options(args, suite, world)
    check_installed(suite.training.report_to)  # a missing tracker fails now, not in every trial
    options = setup_process(suite, quiet)
    if suite.executor == "local" or options.device == "cpu":
        # fail now, not per trial (a Ray driver may have no GPU while its workers do)
        resolve_precision(suite.training.precision, resolve_device(options.device))
    plan = make_plan(suite, registry)
    if rank == 0:
        for warning in plan.data_warnings:  # rows dropped, labels a split lacks: said before any training
            print(f"peftbench: warning: {warning}", file=sys.stderr)
        for warning in plan.warnings:  # a size the user pinned: said before any training
            print(f"peftbench: note: {warning}", file=sys.stderr)
    search = active_search(suite)
    if search is not None:
        SearchRounds(plan, None, registry, search, "")  # a space that does not fit fails now, before any folder
    out = Path(suite.out)
    if getattr(args, "dry_run", False):
        if rank == 0:
            _dry_run(plan, out, registry)
        return 0
    if world > 1:
        init_distributed(cpu=resolve_device(options.device).type == "cpu")
        if rank != 0:
            return _follow_main(plan, options, registry)
    announced = False
    executor = None

    def announce(pending: list[str]) -> None:
        nonlocal announced
        announced = True
        if world > 1:
            broadcast_from_main({"pending": pending})

    try:
        if suite.executor == "ray":
            import_ray()
        if not plan.trials:
            raise ConfigError("the grid is empty")
        artifacts = check_artifacts_dir(suite.artifacts_dir) if suite.artifacts_dir else None
        executor = make_executor(suite.executor, options, registry, suite)
        if suite.executor == "ray" and suite.ray.address:
            executor.connect()  # an unreachable cluster fails before the suite folder is touched
        suite_dir = open_suite_dir(plan, command_line(args), out)
        prepare_trackers(options, plan.name)  # MLflow's store opens (and holds the experiment) before any trial
        if artifacts is None and suite.executor != "local":
            artifacts = str((suite_dir / "trials").absolute())  # workers do not share the driver's working folder
        with Store(suite_dir / STORE_FILE, registry=registry) as store, Claims(store) as claims:
            counts = run_plan(plan, store, suite_dir, executor, quiet, artifacts=artifacts, announce=announce,
                              registry=registry, claims=claims, ahead=world > 1)
            # every process on this suite ends here once the grid is done: one at a time rewrites the report
            report = claims.exclusively("report", lambda: write_report(suite_dir, store, registry))
    except BaseException as exc:
        if world > 1 and not announced:  # the other ranks wait for the trial list: tell them to stop
            broadcast_from_main({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        if executor is not None:
            executor.close()
    parts = [f"{n} {k}" for k, n in counts.items() if n]
    print(f"suite {plan.name}: {', '.join(parts) or 'nothing to do'}; report: {report}")
    if counts["failed"]:
        print(f"{counts['failed']} trial(s) failed; their errors are in the report. Rerun the same command to retry them.",
              file=sys.stderr)
    if counts["waiting"]:
        print(f"{counts['waiting']} final trial(s) wait for a search that selected nothing; rerun the same command.",
              file=sys.stderr)
    return 1 if counts["failed"] or counts["waiting"] else 0


def _dry_run(plan: Plan, out: Path, registry) -> None:
    store_path = out / plan.name / STORE_FILE
    done, warning, search, lines = set(), None, active_search(plan.suite), []
    try:
        check_suite_dir(plan, out)
        with (Store(store_path, create=False) if store_path.is_file() else nullcontext()) as store:
            if search is not None:  # the finals are known once every group's search has selected its values
                rounds = SearchRounds(plan, store, registry, search, "")
                lines = rounds.describe()
                finals, waiting = rounds.finals()
                if waiting:
                    lines.append("final trials: planned at the values the search selects (the lr column above "
                                 "is the planner's, replaced where lr is searched)")
                else:
                    plan = finals
            if store is not None:
                done = {t.trial_id for t in plan.trials if store.is_done(t.trial_id)}
    except ConfigError as exc:
        warning = f"note: a real run would stop here: {exc}"
    print_plan(plan, done)
    if search is not None and not lines:  # the folder is another suite's: the search as planned
        lines = SearchRounds(plan, None, registry, search, "").describe()
    if lines:
        print("\n" + "\n".join(lines))
    if warning:
        print(f"\n{warning}")


def _follow_main(plan: Plan, options: RunOptions, registry) -> int:
    """A rank other than 0: train the trials rank 0 announces, in its order, writing nothing."""
    message = broadcast_from_main(None)
    if "error" in message:
        return 2  # rank 0 reports the error
    trials = {t.trial_id: t for t in plan.trials}
    unknown = [t for t in message["pending"] if t not in trials]
    if unknown:
        raise ConfigError(f"rank {rank_and_world()[0]} planned a different grid than rank 0 (unknown trials "
                          f"{', '.join(unknown[:3])}); start every rank with the same command and files")
    status = 0
    quiet = options.model_copy(update={"quiet": True})  # rank 0 shows the progress
    for trial_id in message["pending"]:
        if execute_trial(trials[trial_id], quiet, None, registry).status == "failed":
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m peftbench.running.runner ...``: the run subcommand alone (used by tests and workers)."""
    import argparse

    parser = argparse.ArgumentParser(prog="peftbench run")
    add_run_arguments(parser)
    parser.add_argument("--plugins-dir", metavar="DIR", help="also load every *.py plugin module in DIR")
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return main_run(args)
    except PeftbenchError as exc:
        print(f"peftbench run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
