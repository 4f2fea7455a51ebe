"""Equal-effort search: N search trials per (task, backbone, method, budget) sampled by Optuna and
selected on validation, then the final seeds at the selected values; resumable like any trial
(a rerun trains nothing, kill -9 loses and duplicates nothing); Optuna's pruner stops hopeless
trials; the declared space and its errors; ``--search-trials 0`` changes nothing.

Trials run for real on test_runner's tiny random BERT and CSV task (a few optimizer steps).
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.running.plan import make_plan
from peftbench.running.runner import main_run, resolve_suite
from peftbench.running.search import (Choice, PastTrial, Pruning, Range, SearchConfig, ask, method_space, parse_param,
                                      pruning_callback, strata)
from test_executors import ray_local  # noqa: F401 - a fixture
from run_helpers import kill_9_run_when
from test_runner import base_args, env, parse, rows, run  # noqa: F401 - env is a fixture

GRID = ("--methods", "lora,houlsby", "--budget", "5%,10%", "--seeds", "2")
#: the brief's command, on the tiny model: budgets both methods reach, 8 steps, validation every 4
SEARCH = (*GRID, "--search-trials", "3", "--max-steps", "8", "--train-limit", "64", "--eval-limit", "32",
          "--test-limit", "32", "--eval-every", "4")


def _group(spec) -> tuple:
    return spec.task.name, spec.backbone, spec.method, spec.budget


def _by_role(records) -> tuple[list, list]:
    return [r for r in records if r.spec.role == "search"], [r for r in records if r.spec.role == "final"]


def _best(search, direction: str = "max"):
    """The selection, written out: best validation value, ties to the lower index."""
    sign = 1 if direction == "max" else -1
    return max(search, key=lambda r: (sign * r.result.val_metrics[r.spec.primary_metric], -r.spec.search_index))


# -- the search end to end -----------------------------------------------------------------------
def test_search_then_finals_at_the_selected_lr_and_a_rerun_trains_nothing(env, tmp_path, capsys, registry):
    out = tmp_path / "reports"
    argv = base_args(env, out, *SEARCH, "--suite", "searched")
    assert run(argv) == 0
    assert "12 searched, 8 done" in capsys.readouterr().out
    records = rows(out, "searched")
    search, finals = _by_role(records)
    assert len(search) == 4 * 3 and len(finals) == 4 * 2
    assert all(r.status == "done" for r in records)
    per_group = Counter(_group(r.spec) for r in search)
    assert set(per_group.values()) == {3}
    for group in per_group:
        trials = sorted((r for r in search if _group(r.spec) == group), key=lambda r: r.spec.search_index)
        assert [r.spec.search_index for r in trials] == [0, 1, 2]
        method = registry.method(group[2])
        space = {"lr": {"low": method.default_lr / 10, "high": method.default_lr * 10, "log": True}}
        for r in trials:  # the default space: lr, a decade each side of the method's default_lr
            assert r.spec.search_space == space and set(r.spec.search_params) == {"lr"}
            assert r.spec.lr == r.spec.search_params["lr"] and space["lr"]["low"] <= r.spec.lr <= space["lr"]["high"]
            assert r.spec.seed == 0 and r.result.metrics == {} and r.result.chance == {}  # never reads test
            assert "test" not in r.result.splits and r.result.val_metrics["accuracy"] is not None
        assert len({r.spec.lr for r in trials}) == 3
        best = _best(trials)
        seeds = [r for r in finals if _group(r.spec) == group]
        assert sorted(r.spec.seed for r in seeds) == [0, 1]
        for r in seeds:  # the final seeds train at the selected value, and say so
            assert r.spec.lr == best.spec.lr and r.spec.search_params == best.spec.search_params
            assert r.spec.search_space == best.spec.search_space and r.spec.search_index is None
            assert set(r.result.metrics) >= {"accuracy"}
    assert len({r.trial_id for r in records}) == len(records)

    before = {r.trial_id: (r.finished_at, r.attempts) for r in records}
    started = time.perf_counter()
    assert run(argv) == 0
    assert "20 skipped" in capsys.readouterr().out
    assert {r.trial_id: (r.finished_at, r.attempts) for r in rows(out, "searched")} == before
    assert time.perf_counter() - started < 30  # nothing trained again
    assert run([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "8 trials (8 already done, 0 to run)" in text and "12 search trials (12 already done)" in text


def test_kill_9_during_the_search_then_a_rerun_leaves_n_per_group_none_twice(env, tmp_path):
    out = tmp_path / "reports"
    argv = base_args(env, out, *SEARCH, "--suite", "killed")
    db = out / "killed" / "results.sqlite"
    kill_9_run_when(argv, tmp_path, lambda: _rows(db),
                    lambda seen: ("search", "done") in seen and ("search", "running") in seen, 180,
                    "a finished and a running search trial")
    killed = {r.trial_id: r for r in rows(out, "killed")}
    in_flight = [r for r in killed.values() if r.status == "running"]
    assert len(in_flight) == 1 and in_flight[0].spec.role == "search"
    done_before = {t: r.finished_at for t, r in killed.items() if r.status == "done"}
    assert not any(r.spec.role == "final" for r in killed.values())  # finals wait for the search

    assert run(argv) == 0
    after = rows(out, "killed")
    search, finals = _by_role(after)
    assert all(r.status == "done" for r in after)
    keys = Counter((_group(r.spec), r.spec.search_index) for r in search)
    assert set(keys.values()) == {1} and len(keys) == 4 * 3  # none twice, none lost
    assert Counter(_group(r.spec) for r in search) == Counter({g: 3 for g in {_group(r.spec) for r in search}})
    assert len(finals) == 8
    by_id = {r.trial_id: r for r in after}
    assert {t: by_id[t].finished_at for t in done_before} == done_before  # kept, not rerun
    rerun = by_id[in_flight[0].trial_id]  # the killed trial ran again with its stored spec (its sampled values)
    assert rerun.attempts == 2 and rerun.spec.search_params == in_flight[0].spec.search_params


def _rows(db: Path) -> list[tuple]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return list(conn.execute("SELECT role, status FROM trials"))
    except sqlite3.OperationalError:  # the table is being created
        return []


def test_the_median_pruner_stops_a_hopeless_trial(env, tmp_path):
    """lr 0.03 first (grid order of seed 1), then lr 1e-12: below the median of the finished one at step 4."""
    suite = tmp_path / "prune.yaml"
    suite.write_text(f"include: {env['suite']}\nsearch:\n  trials: 2\n  sampler: grid\n  seed: 1\n"
                     f"  pruner: median\n  startup_trials: 1\n  space:\n    lr: [0.03, 1.0e-12]\n")
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora", "--budget", "5%", "--seeds", "1", "--max-steps", "12",
                     "--eval-every", "2", "--suite", "pruned")
    argv[argv.index("--config") + 1] = str(suite)
    assert run(argv) == 0
    search, finals = _by_role(rows(out, "pruned"))
    by_lr = {r.spec.lr: r for r in search}
    good, hopeless = by_lr[0.03], by_lr[1e-12]
    assert (good.spec.search_index, hopeless.spec.search_index) == (0, 1)
    assert good.status == "done" and not good.result.pruned and good.result.steps == 12
    assert hopeless.status == "done" and hopeless.result.pruned
    assert hopeless.result.steps == 4 < hopeless.result.planned_steps == 12  # fewer steps
    validated = [c.val_metric for c in hopeless.result.curves if c.val_metric is not None]
    assert hopeless.result.val_metrics["accuracy"] == max(validated)  # its best validation so far
    assert not hopeless.result.stopped_early  # pruned, not patience
    assert [r.spec.lr for r in finals] == [0.03]


def test_optuna_decides_pruning_from_the_groups_finished_trials():
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    past = [PastTrial(params={"lr": 1e-3}, state="complete", value=0.9, intermediate={2: 0.9, 4: 0.9})]

    def pruning(**kw):
        data = dict(direction="max", pruner="median", startup_trials=1, warmup_steps=0, space=space, number=1,
                    past=past)
        return Pruning(**{**data, **kw})

    report = pruning_callback(pruning())
    assert report(2, 0.5) is True  # below the median of the complete trials at step 2
    assert pruning_callback(pruning())(2, 0.95) is False
    assert pruning_callback(pruning(startup_trials=2))(2, 0.5) is False  # too few complete trials yet
    assert pruning_callback(pruning(warmup_steps=3))(2, 0.5) is False
    assert pruning_callback(pruning(direction="min"))(2, 0.5) is False  # lower is better there
    assert pruning_callback(pruning(pruner="none")) is None and pruning_callback(None) is None


def test_asking_is_a_function_of_the_seed_the_index_and_the_history():
    """A resumed search asks what an uninterrupted one would: the study is rebuilt before each ask."""
    config = SearchConfig(trials=4, seed=3)
    space = {"lr": Range(low=1e-4, high=1e-2, log=True), "alpha": Choice(values=[8, 16, 32])}
    first = ask(config, space, "max", [])
    assert ask(config, space, "max", []) == first and set(first) == {"lr", "alpha"}
    past = [PastTrial(params=first, state="complete", value=0.7, intermediate={4: 0.7})]
    second = ask(config, space, "max", past)
    assert second == ask(config, space, "max", past) and second != first
    assert ask(SearchConfig(trials=4, seed=4), space, "max", []) != first
    grid = SearchConfig(trials=3, sampler="grid", space={"lr": "1e-3,1e-2,1e-1"})
    asked, told = [], []
    for _ in range(3):  # the grid visits each point once
        values = ask(grid, grid.space, "max", told)
        asked.append(values["lr"])
        told.append(PastTrial(params=values, state="complete", value=0.5))
    assert sorted(asked) == [1e-3, 1e-2, 1e-1]


# -- samplers and spaces --------------------------------------------------------------------------
def test_grid_cuts_a_range_into_strata_so_few_trials_cannot_bunch_up(registry):
    """3 grid trials over the default lr space: one point per third of the log range, centred on default_lr."""
    config = SearchConfig(trials=3, sampler="grid")
    for name in ("lora", "houlsby", "prompt"):
        method = registry.method(name)
        c = float(method.default_lr)
        values = method_space(config, method)["lr"].values
        assert values == pytest.approx([c / 10 ** (2 / 3), c, c * 10 ** (2 / 3)], rel=1e-3)
    linear = strata("warmup_ratio", Range(low=0.0, high=0.3), 3)
    assert linear.values == pytest.approx([0.05, 0.15, 0.25])
    assert strata("alpha", Range(low=4, high=16), 2).values == [7, 13]
    told, asked = [], []
    space = method_space(config, registry.method("lora"))
    for _ in range(3):
        values = ask(config, space, "max", told)
        asked.append(values["lr"])
        told.append(PastTrial(params=values, state="complete", value=0.5))
    assert sorted(asked) == sorted(space["lr"].values)  # each stratum once
    random = method_space(SearchConfig(trials=3), registry.method("lora"))["lr"]
    assert isinstance(random, Range)  # tpe and random samplers keep the continuous range


def test_grid_sampler_visits_each_point_training_and_method_fields(env, tmp_path):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora,houlsby", "--budget", "5%", "--seeds", "1", "--max-steps", "4",
                     "--search-trials", "4", "--search-sampler", "grid", "--search", "lr=0.003,0.03",
                     "--search", "warmup_ratio=0,0.1", "--search", "alpha=8", "--search-pruner", "none",
                     "--suite", "grid")
    assert run(argv) == 0
    search, finals = _by_role(rows(out, "grid"))
    for method in ("lora", "houlsby"):
        trials = [r for r in search if r.spec.method == method]
        points = {(r.spec.search_params["lr"], r.spec.search_params["warmup_ratio"]) for r in trials}
        assert points == {(0.003, 0), (0.003, 0.1), (0.03, 0), (0.03, 0.1)}  # every point once
        for r in trials:
            assert r.spec.training.warmup_ratio == r.spec.search_params["warmup_ratio"]
            assert r.status == "done" and not r.result.pruned
        if method == "lora":  # a method field applies to the methods whose config has it
            assert all(r.spec.search_params["alpha"] == 8 and r.spec.method_config["alpha"] == 8 for r in trials)
            assert trials[0].spec.search_space["alpha"] == {"values": [8]}
        else:
            assert all("alpha" not in r.spec.search_params for r in trials)
        final = next(r for r in finals if r.spec.method == method)
        best = _best(trials)
        assert final.spec.search_params == best.spec.search_params and final.spec.lr == best.spec.lr
        assert final.spec.training.warmup_ratio == best.spec.training.warmup_ratio
        assert final.spec.method_config == best.spec.method_config


def test_random_sampler_samples_inside_the_declared_ranges(env, tmp_path):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora", "--budget", "5%", "--seeds", "1", "--max-steps", "3",
                     "--search-trials", "3", "--search-sampler", "random", "--search", "lr=1e-3:1e-1:log",
                     "--search", "weight_decay=0:0.1", "--search", "dropout=0.0,0.1", "--suite", "random")
    assert run(argv) == 0
    search, finals = _by_role(rows(out, "random"))
    assert sorted(r.spec.search_index for r in search) == [0, 1, 2]
    for r in search:
        values = r.spec.search_params
        assert 1e-3 <= values["lr"] <= 1e-1 and 0 <= values["weight_decay"] <= 0.1 and values["dropout"] in (0, 0.1)
        assert r.spec.training.weight_decay == values["weight_decay"] and r.spec.method_config["dropout"] == values["dropout"]
    assert r.spec.search_space == {"lr": {"low": 1e-3, "high": 1e-1, "log": True},
                                   "weight_decay": {"low": 0.0, "high": 0.1, "log": False},
                                   "dropout": {"values": [0.0, 0.1]}}
    assert len({r.spec.search_params["lr"] for r in search}) == 3
    assert len(finals) == 1 and finals[0].spec.search_params == _best(search).spec.search_params


def test_declared_space_parsing():
    assert parse_param("lr", "1e-5:1e-2:log") == Range(low=1e-5, high=1e-2, log=True)
    assert parse_param("batch_size", "8:32") == Range(low=8, high=32)
    assert parse_param("alpha", "8,16,32") == Choice(values=[8, 16, 32])
    assert parse_param("targets", "all-linear") == Choice(values=["all-linear"])
    assert parse_param("lr", [1e-3, 1e-2]) == Choice(values=[1e-3, 1e-2])
    assert parse_param("lr", {"low": 1e-4, "high": 1e-2, "log": True}) == Range(low=1e-4, high=1e-2, log=True)
    config = SearchConfig(trials=2, space={"lr": "1e-4:1e-2:log", "warmup_ratio": [0, 0.1]})
    assert config.space["warmup_ratio"] == Choice(values=[0, 0.1])
    assert SearchConfig(trials=2).space is None and SearchConfig().sampler == "tpe"


@pytest.mark.parametrize("extra, message", [
    (["--search", "foo=1:2"], r"unknown parameter 'foo'; allowed: lr, training fields \(epochs, .*warmup_ratio.*\), "
                              r"method fields of the selected methods \(.*alpha.*dropout"),
    (["--search", "lr=1e-2:1e-4"], r"lr=1e-2:1e-4: LOW must be below HIGH"),
    (["--search", "lr=0:1e-2:log"], r"lr=0:1e-2:log: a log range needs LOW > 0"),
    (["--search", "lr=1e-4:1e-2:lin"], r"lr=1e-4:1e-2:lin: write PARAM=LOW:HIGH, PARAM=LOW:HIGH:log or PARAM=V1"),
    (["--search", "lr"], r"--search 'lr': write PARAM=LOW:HIGH"),
    (["--search-sampler", "grid", "--search-trials", "3", "--search", "batch_size=8:9"],
     r"search\.space\.batch_size': the integer range 8:9 has fewer than 3 distinct points for the grid's 3 trials"),
    (["--search", "r=2,4"], r"'r' is the size knob of lora"),
    (["--search", "eval_limit=10,20"], r"'eval_limit' defines the data or the evaluation"),
    (["--search", "warmup_ratio=0:2"], r"search\.space\.warmup_ratio=2.*warmup_ratio.*less than 1"),
    (["--search", "batch_size=8:16.5"], r"batch_size is an integer; 8:16.5 has a fraction"),
    (["--search-sampler", "grid", "--search-trials", "3", "--search", "lr=1e-3,1e-2", "--search", "alpha=8,16"],
     r"the grid of houlsby 5% \(lr=0.001,0.01\) has 2 point\(s\), fewer than the 3 search trials"),
    (["--search-sampler", "grid", "--search-trials", "5", "--search", "lr=1e-3,1e-2", "--search", "alpha=8,16"],
     r"the grid has 4 point\(s\), fewer than the 5 search trials asked for; give --search-trials 4 or more values"),
])
def test_bad_search_input_is_a_one_line_error(env, tmp_path, extra, message):
    argv = base_args(env, tmp_path / "reports", "--methods", "lora,houlsby", "--budget", "5%", "--search-trials", "2",
                     *extra, "--dry-run")
    with pytest.raises(ConfigError, match=message) as caught:
        run(argv)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "reports").exists()


def test_zero_search_trials_plans_what_it_planned_before(env, tmp_path, registry, capsys):
    plain = base_args(env, tmp_path / "reports", *GRID)
    before = make_plan(resolve_suite(parse(plain), registry), registry)
    for extra in (["--search-trials", "0"], ["--search-trials", "0", "--search", "lr=1e-3:1e-1:log"]):
        after = make_plan(resolve_suite(parse([*plain, *extra]), registry), registry)
        assert [t.trial_id for t in after.trials] == [t.trial_id for t in before.trials]
        assert after.trials == before.trials and after.name == before.name
        assert after.suite.hash() == before.suite.hash() and "search" not in after.suite.identity()
    assert run([*plain, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert run([*plain, "--search-trials", "0", "--dry-run"]) == 0
    assert capsys.readouterr().out == text and "search:" not in text
    searched = make_plan(resolve_suite(parse([*plain, "--search-trials", "3"]), registry), registry)
    assert searched.name == f"{before.name}-search3" and searched.suite.hash() != before.suite.hash()


def test_dry_run_prints_the_search_plan(env, tmp_path, capsys):
    argv = base_args(env, tmp_path / "reports", *GRID, "--search-trials", "5", "--search", "lr=1e-4:1e-2:log",
                     "--search", "alpha=8,16", "--dry-run")
    assert run(argv) == 0
    text = capsys.readouterr().out
    assert "search: 5 trial(s) per group x 4 group(s) = 20 search trials (0 already done)" in text
    assert "validation accuracy (max); tpe sampler (seed 0), median pruner" in text
    assert "| lora    | 5%     | 5             | lr=0.0001:0.01:log, alpha=8,16 |" in text
    assert "| houlsby | 10%    | 5             | lr=0.0001:0.01:log             |" in text
    assert "8 trials (0 already done, 8 to run)" in text
    assert not (tmp_path / "reports").exists()


def test_a_search_under_torchrun_is_refused(env, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"rank 0 of 2.*a search \(--search-trials\) runs on one process"):
        main_run(parse(base_args(env, tmp_path / "reports", "--methods", "lora", "--budget", "5%",
                                 "--search-trials", "2", "--dry-run")))


def test_a_search_on_ray_gives_the_local_rows(env, ray_local, tmp_path):
    """The search's jobs (their Optuna pruning context included) go through Ray like any trial."""
    out = tmp_path / "reports"
    grid = ("--methods", "lora,houlsby", "--budget", "5%", "--seeds", "1", "--max-steps", "3", "--search-trials", "2")
    assert run(base_args(env, out, *grid, "--suite", "local")) == 0
    assert run(base_args(env, out, *grid, "--suite", "ray", "--executor", "ray", "--cpus-per-trial", "1")) == 0

    def computed(suite):
        return {r.trial_id: (r.status, r.spec.role, r.spec.search_index, r.spec.search_params, r.result.val_metrics,
                             r.result.metrics, r.result.pruned) for r in rows(out, suite)}

    local = computed("local")
    assert len(local) == 2 * 2 + 2 and computed("ray") == local
