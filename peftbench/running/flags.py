"""The flags of ``peftbench run``, declared once.

Each row of ``FLAGS`` says a flag's group, help, parsing and the suite field it sets
(``training.max_steps``, ``ray.address`` ...). The same table builds the argparse group
(``add_run_arguments``), turns a parsed command line into suite overrides
(``overrides_from_args``) and rebuilds the command for ``suite.json`` (``command_line``).
Adding a run flag is adding a row.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peftbench.errors import ConfigError

ALL = "all"


def split_list(values) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: repeatable, comma-separated flag values."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--budget -1%`` -> ``--budget=-1%``: argparse takes a value that starts with ``-`` and a digit
    for an option (and dumps its usage); attached, the value reaches the check that names what is allowed."""
    out: list[str] = []
    for word in argv:
        if (out and re.match(r"^-[\d.]", word) and out[-1].startswith("--") and "=" not in out[-1]
                and out[-1] != "--"):
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


def limit(text: str):
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


def learning_rates(items: list[str]) -> dict[str, float]:
    """``["lora=5e-4", ...]`` -> ``{"lora": 5e-4}``."""
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--lr {item!r}: write METHOD=VALUE, e.g. --lr lora=5e-4")
    return lrs


def search_space(items: list[str]) -> dict[str, str]:
    """``["lr=1e-5:1e-2:log", "alpha=8,16"]`` -> ``{"lr": "1e-5:1e-2:log", "alpha": "8,16"}`` (parsed by the suite)."""
    space = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"--search {item!r}: write PARAM=LOW:HIGH, PARAM=LOW:HIGH:log or PARAM=V1,V2,..., "
                              f"e.g. --search lr=1e-5:1e-2:log")
        space[name.strip()] = value.strip()
    return space


@dataclass(frozen=True)
class Flag:
    """One ``peftbench run`` flag: ``--<name with dashes>``, its argparse options, the suite field it sets."""

    name: str  # the argparse attribute
    group: str
    help: str
    target: str | None = None  # dotted suite field; None: read by the runner itself
    kind: str = "value"  # value | list (repeatable, comma-separated) | limit | lr | search | switch
    options: dict[str, Any] = field(default_factory=dict)  # type, metavar, choices

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value):
        if self.kind == "list":
            return split_list(value)
        if self.kind == "limit":
            return None if value == ALL else value
        if self.kind == "lr":
            return learning_rates(value)
        if self.kind == "search":
            return search_space(value)
        return value


GROUPS = {"grid": "grid (each flag overrides the --config suite)", "training": "training",
          "search": "search (the same number of trials per method and budget, selected on validation)",
          "output": "output", "executor": "executor"}
RAY_INSTALL = 'pip install "peftbench[ray]"'

FLAGS: tuple[Flag, ...] = (
    Flag("config", "grid", "suite file (configs/*.yaml; include: allowed)", options={"metavar": "SUITE.yaml"}),
    Flag("methods", "grid", "methods or aliases (default: every method of the default grid, full and head included)",
         "methods", "list", {"metavar": "M[,M...]"}),
    Flag("budget", "grid", "budget(s): a fraction such as 3%% or a count such as 500k (default: 0.1%%)", "budgets",
         "list", {"metavar": "B[,B...]"}),
    Flag("backbone", "grid", "minilm, smollm2, a local HF folder or a hub id", "backbones", "list",
         {"metavar": "NAME"}),
    Flag("task", "grid", "movie_sentiment, rotten_tomatoes, trec, sms_spam, e2e_nlg, glue/..., hub:NAME or file:PATH",
         "tasks", "list", {"metavar": "NAME"}),
    Flag("seeds", "grid", "seeds 0..N-1 per method and budget (default: 3)", "seeds", options={"type": int,
                                                                                            "metavar": "N"}),
    Flag("text_column", "grid", "file:/hub: tasks: the text column(s)", kind="list", options={"metavar": "COL"}),
    Flag("label_column", "grid", "file:/hub: tasks: the label (or target) column", options={"metavar": "COL"}),
    Flag("drop_invalid", "grid", "file:/hub: tasks: drop rows without text or label (null, NaN, empty), with a "
         "warning and counts, instead of stopping with an error naming them", kind="switch"),
    Flag("init_from", "grid", "two-stage training: every method starts from its own trained adapter in PATH (a suite "
         "folder: the trial at the same budget and seed; or a trial or adapter folder), same config and base required",
         "init_from", options={"metavar": "PATH"}),
    Flag("preset", "training", "a named schedule: converged (20 epochs, early stopping on validation, capped at "
         "3,000 steps); flags and the suite's training section win over it", "preset", options={"metavar": "NAME"}),
    Flag("step_cap", "training", "at most N optimizer steps per trial, however many epochs", "training.step_cap",
         options={"type": int, "metavar": "N"}),
    Flag("epochs", "training", "passes over the (limited) training split (default: 1)", "training.epochs",
         options={"type": float, "metavar": "N"}),
    Flag("max_steps", "training", "optimizer steps per trial (overrides --epochs)", "training.max_steps",
         options={"type": int, "metavar": "N"}),
    Flag("batch_size", "training", "training batch size (default: 16)", "training.batch_size",
         options={"type": int, "metavar": "N"}),
    Flag("train_limit", "training", "seeded subsample of the training split (default: 800)", "training.train_limit",
         "limit", {"type": limit, "metavar": "N|all"}),
    Flag("eval_limit", "training", "seeded subsample of validation (default: 200), and of test unless --test-limit",
         "training.eval_limit", "limit", {"type": limit, "metavar": "N|all"}),
    Flag("test_limit", "training", "seeded subsample of test (default: 500)", "training.test_limit", "limit",
         {"type": limit, "metavar": "N|all"}),
    Flag("eval_every", "training", "optimizer steps between validation passes (default: 25)", "training.eval_every",
         options={"type": int, "metavar": "N"}),
    Flag("gradient_checkpointing", "training", "recompute each layer's activations in backward instead of keeping "
         "them: less memory, more time per step (training.gradient_checkpointing: true)",
         "training.gradient_checkpointing", options={"action": "store_const", "const": True}),
    Flag("lr", "training", "learning rate of a method (repeatable)", "training.lr", "lr",
         {"action": "append", "metavar": "METHOD=LR"}),
    Flag("device", "training", "auto (default), cpu, cuda, cuda:N or mps", "training.device",
         options={"metavar": "DEV"}),
    Flag("precision", "training", "auto (default): bf16 on CUDA that supports it, fp16 on other CUDA, fp32 elsewhere",
         "training.precision", options={"choices": ["auto", "fp32", "bf16", "fp16"]}),
    Flag("search_trials", "search", "search trials per (task, backbone, method, budget) before the final seeds, "
         "which then run at the values selected on validation (default: 0, no search)", "search.trials",
         options={"type": int, "metavar": "N"}),
    Flag("search", "search", "a searched parameter, SPEC being LOW:HIGH, LOW:HIGH:log or V1,V2,... (repeatable; "
         "replaces the default space, lr log-uniform a decade each side of the method's default_lr): lr, a training "
         "field or a method config field (applied to the methods that have it)", "search.space", "search",
         {"action": "append", "metavar": "PARAM=SPEC"}),
    Flag("search_sampler", "search", "Optuna sampler: tpe (default), grid (value lists; a range is cut into "
         "one point per trial, the midpoints of equal strata) or random",
         "search.sampler", options={"choices": ["tpe", "grid", "random"]}),
    Flag("search_pruner", "search", "Optuna pruner on the validation passes: median (default) or none",
         "search.pruner", options={"choices": ["median", "none"]}),
    Flag("suite", "output", "suite name: results go to OUT/NAME (default: derived from the grid)", "suite",
         options={"metavar": "NAME"}),
    Flag("out", "output", "folder holding the suites (default: reports)", "out", options={"metavar": "DIR"}),
    Flag("dry_run", "output", "print the grid with solved sizes and stop", kind="switch"),
    Flag("quiet", "output", "no progress bars or per-trial lines", kind="switch"),
    Flag("report_to", "output", "trackers each trial logs to, a run of its own (repeatable): tensorboard (events in "
         "its folder), mlflow (MLFLOW_TRACKING_URI, else the file store OUT/SUITE/mlruns; experiment: the suite), "
         "wandb (project: the suite) or none (default)", "training.report_to", "list", {"metavar": "T[,T...]"}),
    Flag("artifacts_dir", "output", "where each trial's folder (weights, logs) goes: a folder, or an fsspec URL such as "
         "s3://bucket/path once its filesystem package is installed (default: OUT/SUITE/trials)", "artifacts_dir",
         options={"metavar": "DIR|URL"}),
    Flag("executor", "executor", "where trials run: local (default; this process, one at a time) or ray (one Ray task "
         f"per trial; needs {RAY_INSTALL})", "executor", options={"choices": ["local", "ray"]}),
    Flag("ray_address", "executor", "ray: auto (the cluster `ray start` joined this machine to), ray://HOST:PORT or "
         "HOST:PORT (default: start a local Ray for this run)", "ray.address", options={"metavar": "ADDR"}),
    Flag("gpus_per_trial", "executor", "ray: GPUs each trial reserves, fractions share a GPU (default: 1 when the "
         "cluster has GPUs and --device is not cpu, else 0)", "ray.gpus_per_trial",
         options={"type": float, "metavar": "N"}),
    Flag("cpus_per_trial", "executor", "ray: CPUs each trial reserves, also its torch threads (default: 1)",
         "ray.cpus_per_trial", options={"type": float, "metavar": "N"}),
)


def add_run_arguments(parser) -> None:
    """The ``run`` flags, grouped as in ``--help``."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in FLAGS:
        if f.kind == "switch":
            groups[f.group].add_argument(f.flag, action="store_true", help=f.help)
        else:
            action = f.options.get("action", "append" if f.kind == "list" else None)
            extra = {k: v for k, v in f.options.items() if k != "action"}
            groups[f.group].add_argument(f.flag, help=f.help, **({"action": action} if action else {}), **extra)


def overrides_from_args(args) -> dict:
    """The command line as a partial suite config (merged over the YAML)."""
    out: dict = {}
    for f in FLAGS:
        value = getattr(args, f.name, None)
        if f.target is None or value is None or value == []:
            continue
        *parents, leaf = f.target.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = f.convert(value)
    training = out.get("training", {})
    if "eval_limit" in training and getattr(args, "test_limit", None) is None:
        training["test_limit"] = training["eval_limit"]  # --eval-limit alone limits test too
    return out


def given(args, prefix: str) -> list[str]:
    """The flags given on the command line whose suite field starts with ``prefix`` (``ray.``)."""
    return [f.flag for f in FLAGS if f.target and f.target.startswith(prefix) and getattr(args, f.name, None) is not None]


def command_line(args) -> str:
    """The command as typed (console script or ``-m``), else rebuilt from ``args`` (library calls)."""
    argv = sys.argv
    orig = getattr(sys, "orig_argv", [])
    prog = Path(argv[0]).name if argv else ""
    module = orig[orig.index("-m") + 1:orig.index("-m") + 2] if "-m" in orig else []
    if prog == "peftbench" or module in (["peftbench"], ["peftbench.cli"]):
        return shlex.join(["peftbench", *argv[1:]])
    if module and module[0].endswith(".runner"):
        return shlex.join(["peftbench", "run", *argv[1:]])
    words = ["peftbench", "run"]
    for f in FLAGS:
        value = getattr(args, f.name, None)
        if value is True:
            words.append(f.flag)
        elif isinstance(value, list):
            for v in value:
                words += [f.flag, str(v)]
        elif value not in (None, False):
            words += [f.flag, str(value)]
    return shlex.join(words)
