"""``peftbench run``: plan the grid, run its trials through an executor, then write the report.

Every trial has one row in ``<out>/<suite>/results.sqlite``; a rerun skips finished rows, so
a killed run resumes and loses only the trial in flight. Only this driver writes the store:
an executor only runs ``execute_trial(payload)`` (``local``: in this process, one at a time;
``ray``: one Ray task per trial, anywhere on a cluster) and calls back here.

Under ``torchrun``/``accelerate launch`` every rank runs the same trials in the same order
(rank 0 decides which are pending and broadcasts them); only rank 0 writes the suite folder,
the store, the artifacts and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from peftbench.running.config import RUN_ONLY, SUITE_RUN_ONLY, SuiteConfig, merge, validate_suite
from peftbench.errors import ConfigError, PeftbenchError
from peftbench.running.executors import (EXECUTORS, LocalExecutor, RayExecutor, broadcast_from_main, check_artifacts_dir,
                        clear_artifacts, execute_trial, import_ray, RAY_INSTALL, init_distributed, make_executor, rank_and_world)
from peftbench.running.plan import Plan, Trial, finish_suite, make_plan, print_plan

__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "execute_trial", "main_run", "run_plan"]

SUITE_FILE = "suite.json"
STORE_FILE = "results.sqlite"


# -- suite folder ----------------------------------------------------------------------------
def _diff(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


def _identity(suite: SuiteConfig) -> dict:
    data = suite.model_dump(mode="json", exclude=set(SUITE_RUN_ONLY))
    for key in RUN_ONLY:
        data["training"].pop(key, None)
    return data


def check_suite_dir(plan: Plan, out: Path) -> dict | None:
    """The folder's ``suite.json`` (None when new); an error when it holds a different suite's results."""
    suite_dir = out / plan.name
    info_path = suite_dir / SUITE_FILE
    advice = "choose another name with --suite NAME or another folder with --out DIR"
    if not info_path.is_file():
        if (suite_dir / STORE_FILE).exists():
            raise ConfigError(f"{suite_dir} holds a results store but no {SUITE_FILE}: it was not written by this "
                              f"suite; nothing was changed; {advice}")
        return None
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{info_path} is not valid JSON ({exc}); refusing to write into {suite_dir}") from None
    if info.get("hash") != plan.suite.hash():
        changes = _diff(info.get("config", {}), _identity(plan.suite))
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes) - 8} more)" if len(changes) > 8 else "")
        raise ConfigError(
            f"{suite_dir} holds the results of a different suite (made by: {info.get('command', '?')}); "
            f"this run differs in {shown or 'its configuration'}. Nothing was changed; {advice}"
        )
    return info


def open_suite_dir(plan: Plan, command: str, out: Path) -> Path:
    """``<out>/<suite>``, refusing one that holds a different suite's results (nothing is touched then)."""
    suite_dir = out / plan.name
    info_path = suite_dir / SUITE_FILE
    info = check_suite_dir(plan, out)
    if info is None:
        info = {"suite": plan.name, "hash": plan.suite.hash(), "command": command, "created_at": _now(),
                "config": _identity(plan.suite), "runs": []}
    info.setdefault("runs", []).append({"command": command, "at": _now()})
    suite_dir.mkdir(parents=True, exist_ok=True)
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(info_path)
    return suite_dir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- executing (executors.py holds execute_trial and the executors) ------------------------
def run_plan(plan: Plan, store, suite_dir: Path, executor, quiet: bool = False, artifacts: str | None = None,
             announce: Callable[[list[str]], None] | None = None) -> dict[str, int]:
    """Record unreachable rows, run the trials not finished yet; returns counts by status.

    ``artifacts``: the folder or URL that holds one folder per trial (default: ``suite_dir/trials``);
    ``announce(pending_ids)`` is called once the pending trials are known, before any runs.
    """
    from tqdm.auto import tqdm

    root = artifacts.rstrip("/") if artifacts else str(suite_dir / "trials")

    counts = {"skipped": 0, "done": 0, "failed": 0, "diverged": 0, "unreachable": 0}
    for trial in plan.unreachable:
        if not store.is_done(trial.trial_id):
            store.fail(trial.trial_id, "unreachable", trial.note, {k: v for k, v in trial.row.items() if k != "trial_id"})
        counts["unreachable"] += 1
    pending = []
    for trial in plan.trials:
        if store.is_done(trial.trial_id):
            counts["skipped"] += 1
            continue
        trial.payload["artifacts"] = f"{root}/{trial.trial_id}"
        trial.payload["quiet"] = quiet
        trial.payload["training"] = {**trial.payload["training"], **_run_options(plan.suite)}
        pending.append(trial)
    prepare = getattr(executor, "prepare", None)
    if prepare is not None:
        prepare(pending)
    if announce is not None:
        announce([t.trial_id for t in pending])
    bar = tqdm(total=len(plan.trials), initial=counts["skipped"], desc=f"suite {plan.name}", position=0,
               disable=quiet, dynamic_ncols=True, unit="trial")

    def on_start(trial: Trial) -> None:
        clear_artifacts(trial.payload["artifacts"])  # leftovers of a killed or failed attempt
        store.start(trial.row)
        bar.set_postfix_str(trial.label, refresh=True)

    def on_done(trial: Trial, outcome: dict) -> None:
        status, result = outcome["status"], dict(outcome.get("result") or {})
        if status == "done":
            store.finish(trial.trial_id, result)
            metric = (result.get("metrics") or {}).get(result.get("primary_metric"))
            line = f"{trial.label}: {result.get('primary_metric')} {metric:.4f}" if metric is not None else trial.label
        else:
            store.fail(trial.trial_id, status, outcome["error"], result)
            line = f"{trial.label}: {status.upper()}: {outcome['error']}"
        counts[status] += 1
        bar.update(1)
        if not quiet:
            bar.write(line)

    try:
        executor.run(pending, on_start, on_done)
    finally:
        bar.close()
    return counts


def _run_options(suite: SuiteConfig) -> dict:
    """Options that change how a trial runs but not its id (device, threads, saving)."""
    return {k: getattr(suite.training, k) for k in RUN_ONLY}


# -- command line ----------------------------------------------------------------------------
def _split(values) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


ALL = "all"


def _limit(text: str):
    """A subsample size, or ``all`` for the whole split."""
    if text.strip().lower() in (ALL, "none"):
        return ALL
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count or 'all'")
    return value


def add_run_arguments(parser) -> None:
    g = parser.add_argument_group("grid (each flag overrides the --config suite)")
    g.add_argument("--config", metavar="SUITE.yaml", help="suite file (configs/*.yaml; include: allowed)")
    g.add_argument("--methods", action="append", metavar="M[,M...]",
                   help="methods or aliases (default: every built-in method plus full and head)")
    g.add_argument("--budget", action="append", metavar="B[,B...]",
                   help="budget(s): a fraction such as 3%% or a count such as 500k (default: 1%%)")
    g.add_argument("--backbone", action="append", metavar="NAME", help="minilm, smollm2, a local HF folder or a hub id")
    g.add_argument("--task", action="append", metavar="NAME",
                   help="movie_sentiment, rotten_tomatoes, trec, sms_spam, e2e_nlg, glue/..., hub:NAME or file:PATH")
    g.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 per method and budget (default: 3)")
    g.add_argument("--text-column", action="append", metavar="COL", help="file:/hub: tasks: the text column(s)")
    g.add_argument("--label-column", metavar="COL", help="file:/hub: tasks: the label (or target) column")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=float, metavar="N", help="passes over the (limited) training split (default: 1)")
    t.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps per trial (overrides --epochs)")
    t.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default: 16)")
    t.add_argument("--train-limit", type=_limit, metavar="N|all", help="seeded subsample of the training split (default: 800)")
    t.add_argument("--eval-limit", type=_limit, metavar="N|all",
                   help="seeded subsample of validation (default: 200), and of test unless --test-limit")
    t.add_argument("--test-limit", type=_limit, metavar="N|all", help="seeded subsample of test (default: 500)")
    t.add_argument("--eval-every", type=int, metavar="N", help="optimizer steps between validation passes (default: 25)")
    t.add_argument("--lr", action="append", metavar="METHOD=LR", help="learning rate of a method (repeatable)")
    t.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 on CUDA that supports it, fp16 on other CUDA, fp32 elsewhere")
    o = parser.add_argument_group("output")
    o.add_argument("--suite", metavar="NAME", help="suite name: results go to OUT/NAME (default: derived from the grid)")
    o.add_argument("--out", metavar="DIR", help="folder holding the suites (default: reports)")
    o.add_argument("--dry-run", action="store_true", help="print the grid with solved sizes and stop")
    o.add_argument("--quiet", action="store_true", help="no progress bars or per-trial lines")
    o.add_argument("--artifacts-dir", metavar="DIR|URL",
                   help="where each trial's folder (weights, logs) goes: a folder, or an fsspec URL such as "
                        "s3://bucket/path once its filesystem package is installed (default: OUT/SUITE/trials)")
    x = parser.add_argument_group("executor")
    x.add_argument("--executor", choices=sorted(EXECUTORS), default=None,
                   help="where trials run: local (default; this process, one at a time) or ray (one Ray task per "
                        f"trial; needs {RAY_INSTALL})")
    x.add_argument("--ray-address", metavar="ADDR",
                   help="ray: auto (the cluster `ray start` joined this machine to), ray://HOST:PORT or HOST:PORT "
                        "(default: start a local Ray for this run)")
    x.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="ray: GPUs each trial reserves, fractions share a GPU (default: 1 when the cluster has "
                        "GPUs and --device is not cpu, else 0)")
    x.add_argument("--cpus-per-trial", type=float, metavar="N",
                   help="ray: CPUs each trial reserves, also its torch threads (default: 1)")


def overrides_from_args(args) -> dict:
    """The command line as a partial suite config (merged over the YAML)."""
    out: dict = {}
    training: dict = {}
    if getattr(args, "methods", None):
        out["methods"] = _split(args.methods)
    if getattr(args, "budget", None):
        out["budgets"] = _split(args.budget)
    if getattr(args, "backbone", None):
        out["backbones"] = _split(args.backbone)
    if getattr(args, "task", None):
        out["tasks"] = _split(args.task)
    for flag, key in (("seeds", "seeds"), ("suite", "suite"), ("out", "out"), ("executor", "executor"),
                      ("artifacts_dir", "artifacts_dir")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    ray = {key: getattr(args, flag) for flag, key in RAY_FLAGS.items() if getattr(args, flag, None) is not None}
    if ray:
        out["ray"] = ray
    for flag in ("epochs", "max_steps", "batch_size", "train_limit", "eval_limit", "test_limit", "eval_every",
                 "device", "precision"):
        if getattr(args, flag, None) is not None:
            training[flag] = None if getattr(args, flag) == ALL else getattr(args, flag)
    if getattr(args, "eval_limit", None) is not None and getattr(args, "test_limit", None) is None:
        training["test_limit"] = training["eval_limit"]  # --eval-limit alone limits test too
    if getattr(args, "lr", None):
        lrs = {}
        for item in args.lr:
            name, sep, value = item.partition("=")
            try:
                lrs[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not name.strip():
                raise ConfigError(f"--lr {item!r}: write METHOD=VALUE, e.g. --lr lora=5e-4")
        training["lr"] = lrs
    if training:
        out["training"] = training
    return out


#: command-line flag (attribute) -> field of the suite's ``ray`` section
RAY_FLAGS = {"ray_address": "address", "gpus_per_trial": "gpus_per_trial", "cpus_per_trial": "cpus_per_trial"}


def resolve_suite(args, registry) -> SuiteConfig:
    """YAML (if any) < flags; named tasks/methods keep their YAML details (columns, config, lr)."""
    from peftbench.running.config import read_yaml

    base = read_yaml(args.config) if getattr(args, "config", None) else {}
    over = overrides_from_args(args)
    for key in ("tasks", "methods"):  # --methods lora keeps the YAML's {name: lora, config: ...}
        if key in over and isinstance(base.get(key), list):
            known = {}
            for item in base[key]:
                if isinstance(item, dict) and "name" in item:
                    known[_canonical(key, item["name"], registry)] = item
            over[key] = [known.get(_canonical(key, n, registry), n) for n in over[key]]
    if getattr(args, "text_column", None) or getattr(args, "label_column", None):
        tasks = over.get("tasks", base.get("tasks"))
        if not tasks:
            raise ConfigError("--text-column/--label-column apply to file:/hub: tasks; give one with --task file:PATH")
        columns = {"text_columns": _split(args.text_column) or None, "label_column": args.label_column}
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


_FLAGS = ("config", "methods", "budget", "backbone", "task", "seeds", "text_column", "label_column", "epochs",
          "max_steps", "batch_size", "train_limit", "eval_limit", "test_limit", "eval_every", "lr", "device",
          "precision", "suite", "out", "artifacts_dir", "executor", "ray_address", "gpus_per_trial", "cpus_per_trial",
          "quiet")


def command_line(args) -> str:
    """The command as typed (console script or ``-m``), else rebuilt from ``args`` (library calls)."""
    argv = sys.argv
    orig = getattr(sys, "orig_argv", [])
    prog = Path(argv[0]).name if argv else ""
    if prog == "peftbench":
        return shlex.join(["peftbench", *argv[1:]])
    if "-m" in orig and orig[orig.index("-m") + 1:orig.index("-m") + 2] in (["peftbench"], ["peftbench.cli"]):
        return shlex.join(["peftbench", *argv[1:]])
    if "-m" in orig and orig[orig.index("-m") + 1:orig.index("-m") + 2] == ["peftbench.running.runner"]:
        return shlex.join(["peftbench", "run", *argv[1:]])
    words = ["peftbench", "run"]
    for name in _FLAGS:
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for v in value:
                words += [flag, str(v)]
        elif value not in (None, False):
            words += [flag, str(value)]
    return shlex.join(words)


def setup_process(suite: SuiteConfig, quiet: bool) -> None:
    """CPU threads, allocator, device pinning and library verbosity for a run."""
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
        suite.training.device = "cuda"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _registry(args):
    """The plugin registry, with ``peftbench --plugins-dir DIR run ...``'s folder loaded."""
    from peftbench.contract.registry import get_registry, set_registry

    if getattr(args, "plugins_dir", None):
        registry = get_registry(plugins_dir=args.plugins_dir)
        set_registry(registry)
        return registry
    return get_registry()


def check_run_options(args, suite: SuiteConfig, world: int) -> None:
    """Executor flags that cannot apply, and device choices that cannot work, as clear errors."""
    given = ["--" + flag.replace("_", "-") for flag in RAY_FLAGS if getattr(args, flag, None) is not None]
    if given and suite.executor != "ray":
        raise ConfigError(f"{', '.join(given)} apply to --executor ray; this run uses --executor {suite.executor}")
    device = suite.training.device
    if suite.executor == "ray" and device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with --executor ray: Ray assigns each trial its GPU(s); "
                          f"use --device cuda (or auto) with --gpus-per-trial N")
    if world > 1:
        if suite.executor != "local":
            raise ConfigError(f"this process is rank {rank_and_world()[0]} of {world} (torchrun/accelerate launch): "
                              f"one trial spans the ranks, so --executor must be local (not {suite.executor})")
        if device.startswith("cuda:"):
            raise ConfigError(f"--device {device} under torchrun/accelerate launch: each rank uses the GPU of its "
                              f"LOCAL_RANK; use --device cuda or auto")


def main_run(args) -> int:
    from peftbench.running.device import resolve_device, resolve_precision
    from peftbench.results.store import Store

    registry = _registry(args)
    suite = resolve_suite(args, registry)
    quiet = bool(getattr(args, "quiet", False))
    rank, world = rank_and_world()
    check_run_options(args, suite, world)
    setup_process(suite, quiet)
    if suite.executor == "local" or suite.training.device == "cpu":
        # fail now, not per trial (a Ray driver may have no GPU while its workers do)
        resolve_precision(suite.training.precision, resolve_device(suite.training.device))
    plan = make_plan(suite, registry)
    out = Path(suite.out)
    if getattr(args, "dry_run", False):
        if rank == 0:
            _dry_run(plan, out)
        return 0
    if world > 1:
        init_distributed(cpu=resolve_device(suite.training.device).type == "cpu")
        if rank != 0:
            return _follow_main(plan)
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
        if not plan.trials and not plan.unreachable:
            raise ConfigError("the grid is empty")
        artifacts = check_artifacts_dir(suite.artifacts_dir) if suite.artifacts_dir else None
        executor = make_executor(suite.executor, suite, registry)
        executor.quiet = quiet
        if suite.executor == "ray" and suite.ray.address:
            executor.connect()  # an unreachable cluster fails before the suite folder is touched
        suite_dir = open_suite_dir(plan, command_line(args), out)
        if artifacts is None and suite.executor != "local":
            artifacts = str((suite_dir / "trials").absolute())  # workers do not share the driver's working folder
        with Store(suite_dir / STORE_FILE) as store:
            counts = run_plan(plan, store, suite_dir, executor, quiet, artifacts=artifacts, announce=announce)
            report = _write_report(suite_dir, store, registry)
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
        return 1
    return 0


def _write_report(suite_dir: Path, store, registry):
    from peftbench.report import write_report

    return write_report(suite_dir, store, registry)


def _dry_run(plan: Plan, out: Path) -> None:
    from peftbench.results.store import Store

    store_path = out / plan.name / STORE_FILE
    done, warning = set(), None
    try:
        check_suite_dir(plan, out)
        if store_path.is_file():
            with Store(store_path, create=False) as store:
                done = {t.trial_id for t in plan.trials if store.is_done(t.trial_id)}
    except ConfigError as exc:
        warning = f"note: a real run would stop here: {exc}"
    print_plan(plan, done)
    if warning:
        print(f"\n{warning}")


def _follow_main(plan: Plan) -> int:
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
    for trial_id in message["pending"]:
        trial = trials[trial_id]
        payload = {**trial.payload, "artifacts": None, "quiet": True,
                   "training": {**trial.payload["training"], **_run_options(plan.suite)}}
        if execute_trial(payload)["status"] == "failed":
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m peftbench.running.runner ...``: the run subcommand alone (used by tests and workers)."""
    import argparse

    parser = argparse.ArgumentParser(prog="peftbench run")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_run(args)
    except PeftbenchError as exc:
        print(f"peftbench run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
