"""``peftbench run``: plan the grid, run its trials through an executor, then write the report.

Every trial has one row in ``<out>/<suite>/results.sqlite``; a rerun skips finished rows, so
a killed run resumes and loses only the trial in flight. Only this driver writes the store:
an executor only runs ``execute_trial(payload)`` (``local``: in this process, one at a time;
a distributed executor, e.g. Ray, runs the same function elsewhere with the same callbacks).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .config import RUN_ONLY, SuiteConfig, merge, validate_suite
from .errors import ConfigError, PeftbenchError
from .grid import Plan, Trial, finish_suite, make_plan, print_plan

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
    data = suite.model_dump(mode="json", exclude={"suite", "out", "executor"})
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


# -- executing -------------------------------------------------------------------------------
def execute_trial(payload: dict) -> dict:
    """Run one trial, never raising for the trial's own errors: {status, error, result}."""
    from .train import Diverged
    from .trial import run_trial

    try:
        return {"status": "done", "error": None, "result": run_trial(payload)}
    except Diverged as exc:
        return {"status": "diverged", "error": str(exc), "result": exc.result}
    except Exception as exc:  # noqa: BLE001 - any failure is recorded and the grid goes on
        tb = traceback.format_exc()
        if payload.get("artifacts"):
            directory = Path(payload["artifacts"])
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "error.txt").write_text(tb)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})",
                "result": {"artifacts": payload["artifacts"]} if payload.get("artifacts") else {}}


class LocalExecutor:
    """One trial at a time, in this process."""

    name = "local"

    def run(self, trials: list[Trial], on_start: Callable[[Trial], None], on_done: Callable[[Trial, dict], None]) -> None:
        for trial in trials:
            on_start(trial)
            on_done(trial, execute_trial(trial.payload))


#: ``--executor`` choices; ``ray`` joins them later (same interface)
EXECUTORS: dict[str, Callable[..., object]] = {"local": LocalExecutor}


def run_plan(plan: Plan, store, suite_dir: Path, executor, quiet: bool = False) -> dict[str, int]:
    """Record unreachable rows, run the trials not finished yet; returns counts by status."""
    from tqdm.auto import tqdm

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
        trial.payload["artifacts"] = str(suite_dir / "trials" / trial.trial_id)
        trial.payload["quiet"] = quiet
        trial.payload["training"] = {**trial.payload["training"], **_run_options(plan.suite)}
        pending.append(trial)
    bar = tqdm(total=len(plan.trials), initial=counts["skipped"], desc=f"suite {plan.name}", position=0,
               disable=quiet, dynamic_ncols=True, unit="trial")

    def on_start(trial: Trial) -> None:
        directory = Path(trial.payload["artifacts"])
        if directory.exists():  # leftovers of a killed or failed attempt
            shutil.rmtree(directory)
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
    o.add_argument("--executor", choices=sorted(EXECUTORS), default=None, help="where trials run (default: local)")


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
    for flag, key in (("seeds", "seeds"), ("suite", "suite"), ("out", "out"), ("executor", "executor")):
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
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


def resolve_suite(args, registry) -> SuiteConfig:
    """YAML (if any) < flags; named tasks/methods keep their YAML details (columns, config, lr)."""
    from .config import read_yaml

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
          "precision", "suite", "out", "executor", "quiet")


def command_line(args) -> str:
    """The command as typed (console script or ``-m``), else rebuilt from ``args`` (library calls)."""
    argv = sys.argv
    orig = getattr(sys, "orig_argv", [])
    prog = Path(argv[0]).name if argv else ""
    if prog == "peftbench":
        return shlex.join(["peftbench", *argv[1:]])
    if "-m" in orig and orig[orig.index("-m") + 1:orig.index("-m") + 2] in (["peftbench"], ["peftbench.cli"]):
        return shlex.join(["peftbench", *argv[1:]])
    if "-m" in orig and orig[orig.index("-m") + 1:orig.index("-m") + 2] == ["peftbench.runner"]:
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

    from .costs import cpu_count, tune_malloc

    tune_malloc()
    torch.set_num_threads(suite.training.threads or cpu_count())
    device = suite.training.device
    if device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
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


def main_run(args) -> int:
    from .plugins import get_registry
    from .report import write_report
    from .store import Store

    registry = get_registry()
    suite = resolve_suite(args, registry)
    quiet = bool(getattr(args, "quiet", False))
    setup_process(suite, quiet)
    from .device import resolve_device, resolve_precision

    resolve_precision(suite.training.precision, resolve_device(suite.training.device))  # fail now, not per trial
    plan = make_plan(suite, registry)
    out = Path(suite.out)
    if getattr(args, "dry_run", False):
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
        return 0
    if not plan.trials and not plan.unreachable:
        raise ConfigError("the grid is empty")
    suite_dir = open_suite_dir(plan, command_line(args), out)
    executor = EXECUTORS[suite.executor]()
    with Store(suite_dir / STORE_FILE) as store:
        counts = run_plan(plan, store, suite_dir, executor, quiet)
        report = write_report(suite_dir, store, registry)
    parts = [f"{n} {k}" for k, n in counts.items() if n]
    print(f"suite {plan.name}: {', '.join(parts) or 'nothing to do'}; report: {report}")
    if counts["failed"]:
        print(f"{counts['failed']} trial(s) failed; their errors are in the report. Rerun the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m peftbench.runner ...``: the run subcommand alone (used by tests and workers)."""
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
