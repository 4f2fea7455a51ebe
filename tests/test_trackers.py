"""Trackers through transformers' ``report_to``: TensorBoard event files and MLflow runs from a small
suite, offline (MLflow's file store), one run per trial; the choice never changes a trial's id.

Trials train for real on a tiny random BERT and a synthetic CSV task (``run_helpers``): 4 optimizer
steps, the loss logged at every step, validation at steps 2 and 4.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.results.store import Store
from peftbench.running.options import RunOptions
from peftbench.running.plan import make_plan
from peftbench.running.runner import add_run_arguments, main, main_run, resolve_suite
from peftbench.running.trackers import TrialTracking, folder_name, run_name
from test_runner import base_args as runner_args, make_env

import mlflow  # noqa: E402,F401 - test dependencies (the test extra): missing means a broken set-up
import tensorboard  # noqa: E402,F401

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAINING = "seeds: 1\ntraining:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n" \
           "  max_steps: 4\n  eval_every: 2\n  patience: null\n"
ALLOWED = "allowed: tensorboard, mlflow, wandb, none"


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # validation every 2 of 4 steps: two points in each tracker's history
    return make_env(tmp_path_factory.mktemp("trackers"), TRAINING)


@pytest.fixture
def file_stores(monkeypatch):
    """No tracking URI from the caller's shell; MLflow 3's file store allowed for the test's own reads."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def base_args(env, out: Path, *extra: str) -> list[str]:
    return runner_args(env, out, "--methods", "lora", "--budget", "5%", *extra)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(argv)


def records(out: Path, suite: str):
    with Store(out / suite / "results.sqlite", create=False) as store:
        return store.records()


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    return client, client.search_runs([found.experiment_id])


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def same(points, expected) -> bool:
    """The same steps, the same values up to float32 rounding (TensorBoard stores float32)."""
    return [s for s, _ in points] == [s for s, _ in expected] and \
        [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-5)


# -- TensorBoard and MLflow from one small suite -------------------------------------------------
def test_a_suite_logs_each_trial_to_tensorboard_and_to_mlflow_under_the_suite(env, tmp_path, registry, file_stores):
    out = tmp_path / "out"
    assert main_run(parse(base_args(env, out, "--suite", "tracked", "--report-to", "tensorboard",
                                    "--report-to", "mlflow"))) == 0
    (record,) = records(out, "tracked")
    assert record.status == "done"
    result, spec = record.result, record.spec
    losses = [(c.step, c.loss) for c in result.curves if c.loss is not None]
    vals = [(c.step, c.val_metric) for c in result.curves if c.val_metric is not None]
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in vals] == [2, 4]

    # TensorBoard: the trial's folder holds one run, named after the trial
    runs_dir = Path(result.artifacts) / "tensorboard"
    assert [p.name for p in runs_dir.iterdir()] == [folder_name(run_name(spec))]
    logged = scalars(runs_dir / folder_name(run_name(spec)))
    assert same(logged["train/loss"], losses)
    assert same(logged["eval/accuracy"], vals)  # the validation metric at each pass
    assert same(logged["test/accuracy"], [(result.best_step, result.metrics["accuracy"])])

    # MLflow: without MLFLOW_TRACKING_URI, the file store <suite>/mlruns; experiment = the suite
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run left the environment as it found it
    client, found = runs((out / "tracked" / "mlruns").as_uri(), "tracked")
    (run,) = found
    assert run.info.status == "FINISHED" and run.info.run_name == run_name(spec)
    assert run.data.tags["trial_id"] == record.trial_id and run.data.tags["method"] == "lora"
    assert same(history(client, run, "loss"), losses)
    assert same(history(client, run, "eval_accuracy"), vals)
    assert same(history(client, run, "test_accuracy"), [(result.best_step, result.metrics["accuracy"])])


def test_mlflow_runs_go_to_the_tracking_uri_one_per_trial_with_the_trial_params(env, tmp_path, registry, file_stores,
                                                                                monkeypatch):
    store = (tmp_path / "elsewhere" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # a file store the user names: peftbench allows it for its trials
    out = tmp_path / "out"
    argv = base_args(env, out, "--suite", "ml", "--seeds", "2", "--report-to", "mlflow")
    assert main_run(parse(argv)) == 0
    assert not (out / "ml" / "mlruns").exists() and os.environ["MLFLOW_TRACKING_URI"] == store
    done = {r.trial_id: r for r in records(out, "ml")}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, found = runs(store, "ml")
    assert len(found) == 2 and {r.data.tags["trial_id"] for r in found} == set(done)
    for run in found:
        record = done[run.data.tags["trial_id"]]
        spec, result = record.spec, record.result
        tags, params = run.data.tags, run.data.params
        assert (tags["method"], tags["budget"], tags["seed"], tags["role"]) == ("lora", "5%", str(spec.seed), "final")
        assert tags["backbone"] == spec.backbone and tags["suite"] == "ml"
        assert float(params["peftbench.lr"]) == spec.lr == float(params["learning_rate"])  # ours and the Trainer's
        assert params["peftbench.method.r"] == str(spec.method_config["r"]) and params["seed"] == str(spec.seed)
        assert int(params["peftbench.trainable_params"]) == spec.trainable_params
        assert same(history(client, run, "loss"), [(c.step, c.loss) for c in result.curves if c.loss is not None])
        assert [s for s, _ in history(client, run, "eval_accuracy")] == [2, 4]
        assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["accuracy"])

    # the tracker is a run option: the same command without it names the same trials, which are done
    assert main_run(parse([a for a in argv if a not in ("--report-to", "mlflow")])) == 0
    again = {r.trial_id: r for r in records(out, "ml")}
    assert {k: r.attempts for k, r in again.items()} == {k: r.attempts for k, r in done.items()}
    assert len(runs(store, "ml")[1]) == 2


def test_the_tracker_never_changes_trial_ids_or_the_suite_hash(env, tmp_path, registry):
    argv = base_args(env, tmp_path, "--seeds", "2")
    plain = resolve_suite(parse(argv), registry)
    tracked = resolve_suite(parse([*argv, "--report-to", "tensorboard,mlflow", "--report-to", "wandb"]), registry)
    assert tracked.training.report_to == ["tensorboard", "mlflow", "wandb"] and plain.training.report_to == []
    assert tracked.hash() == plain.hash() and tracked.identity() == plain.identity()
    assert [t.trial_id for t in make_plan(tracked, registry).trials] == \
        [t.trial_id for t in make_plan(plain, registry).trials]


def test_yaml_report_to_reaches_the_run_options_and_the_flag_wins(env, tmp_path, registry):
    suite = tmp_path / "tracked.yaml"
    suite.write_text(f"include: {env['suite']}\ntraining:\n  report_to: [tensorboard, mlflow]\n")
    argv = [*base_args(env, tmp_path / "out"), "--config", str(suite), "--suite", "y"]
    options = RunOptions.from_suite(resolve_suite(parse(argv), registry))
    assert options.report_to == ("tensorboard", "mlflow") and options.tracker_dir == str((tmp_path / "out" / "y").absolute())
    assert options.mlflow_uri in (os.environ.get("MLFLOW_TRACKING_URI"), (tmp_path / "out" / "y" / "mlruns").as_uri())
    none = RunOptions.from_suite(resolve_suite(parse([*argv, "--report-to", "none"]), registry))
    assert none.report_to == () and none.mlflow_uri is None


@pytest.mark.parametrize("given, message", [
    (["--report-to", "tensorbord"], "'tensorbord' is not a tracker (did you mean 'tensorboard'?); " + ALLOWED),
    (["--report-to", "mlflow,comet"], "'comet' is not a tracker; " + ALLOWED),
    (["--report-to", "none,mlflow"], "'none' cannot be combined with trackers"),
])
def test_a_bad_tracker_is_a_one_line_error(env, tmp_path, registry, capsys, given, message):
    argv = base_args(env, tmp_path, *given)
    with pytest.raises(ConfigError) as err:
        resolve_suite(parse(argv), registry)
    assert message in str(err.value) and "training.report_to" in str(err.value) and "\n" not in str(err.value)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and not (tmp_path / "default").exists()


def test_a_bad_tracker_in_yaml_names_the_field_and_the_file(env, tmp_path, registry):
    suite = tmp_path / "bad.yaml"
    suite.write_text(f"include: {env['suite']}\ntraining:\n  report_to: [mlfow]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'training.report_to'.*'mlfow' is not a tracker \(did you "
                                          r"mean 'mlflow'\?\); allowed: tensorboard, mlflow, wandb, none"):
        resolve_suite(parse([*base_args(env, tmp_path), "--config", str(suite)]), registry)


def test_a_tracker_that_is_not_installed_fails_before_any_trial(env, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec  # wandb is absent here; made absent for sure, installed or not
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "out"
    assert main(base_args(env, out, "--suite", "w", "--report-to", "wandb")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--report-to wandb needs the 'wandb' package" in lines[0]
    assert "pip install wandb" in lines[0] and not (out / "w").exists()


def test_a_trial_that_raises_ends_its_mlflow_run_failed_and_restores_the_tracking_uri(env, tmp_path, registry,
                                                                                       file_stores):
    import mlflow

    plan = make_plan(resolve_suite(parse(base_args(env, tmp_path, "--suite", "f")), registry), registry)
    (spec,) = plan.trials
    uri = (tmp_path / "mlruns").as_uri()
    options = RunOptions(report_to=("mlflow", "tensorboard"), tracker_dir=str(tmp_path), mlflow_uri=uri)
    with pytest.raises(RuntimeError, match="boom"):
        with TrialTracking(spec, options, tmp_path / "trial") as tracking:
            assert tracking.report_to == ["mlflow", "tensorboard"]
            assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "trial" / "tensorboard" /
                                                                folder_name(run_name(spec)))
            raise RuntimeError("boom")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert not mlflow.is_tracking_uri_set() and mlflow.active_run() is None
    (run,) = runs(uri, "f")[1]
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"
    assert run.data.tags["trial_id"] == spec.trial_id
    # no folder to keep events in (a rank > 0, a library call): TensorBoard is left out, MLflow stays
    assert TrialTracking(spec, options, None).report_to == ["mlflow"]
    assert TrialTracking(spec, RunOptions(), tmp_path).report_to == "none"


def test_a_reused_final_trial_gets_its_own_runs_with_the_search_curves_and_its_test(env, tmp_path, registry,
                                                                                     file_stores):
    out = tmp_path / "out"
    argv = base_args(env, out, "--suite", "s", "--search-trials", "2", "--search", "lr=1e-3,5e-3",
                     "--search-sampler", "grid", "--search-pruner", "none", "--report-to", "tensorboard,mlflow")
    assert main_run(parse(argv)) == 0
    recs = records(out, "s")
    (final,) = [r for r in recs if r.spec.role == "final"]
    search = {r.trial_id: r for r in recs if r.spec.role == "search"}
    chosen = search[final.result.environment["reused_search_trial"]]
    client, found = runs((out / "s" / "mlruns").as_uri(), "s")
    by_trial = {r.data.tags["trial_id"]: r for r in found}
    assert set(by_trial) == {final.trial_id, *search}  # one run per trial, search trials included
    for trial_id in search:
        assert "test_accuracy" not in by_trial[trial_id].data.metrics  # selection never sees test
    run = by_trial[final.trial_id]
    assert run.data.tags["reused_search_trial"] == chosen.trial_id and run.info.status == "FINISHED"
    assert history(client, run, "loss") == history(client, by_trial[chosen.trial_id], "loss")
    assert run.data.metrics["test_accuracy"] == pytest.approx(final.result.metrics["accuracy"])
    events = Path(final.result.artifacts) / "tensorboard"
    assert [p.name for p in events.iterdir()] == [folder_name(run_name(final.spec))]  # the search's events, renamed
    logged = scalars(events / folder_name(run_name(final.spec)))
    assert logged["train/loss"] == scalars(Path(chosen.result.artifacts) / "tensorboard" /
                                           folder_name(run_name(chosen.spec)))["train/loss"]
    assert logged["test/accuracy"][0][1] == pytest.approx(final.result.metrics["accuracy"], rel=1e-5)
