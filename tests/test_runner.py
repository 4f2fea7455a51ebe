"""The run: grid expansion and solving, dry run, trials into the store, resume, failures, kill -9.

Trials run for real on a tiny random BERT saved as a Hugging Face folder (byte-level
tokenizer) and a synthetic CSV task loaded through ``file:``; a few optimizer steps each.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

import pytest

import peftbench
from peftbench.errors import BudgetError, ConfigError
from peftbench.running.execute import execute_trial
from peftbench.running.options import RunOptions
from peftbench.running.plan import make_plan
from peftbench.running.runner import add_run_arguments, main_run, resolve_suite
from peftbench.results.store import Store
from run_helpers import kill_9_run_when, make_sentiment_csv, make_tiny_model

TRAINING = "seeds: 1\ntraining:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n  max_steps: 3\n" \
           "  eval_every: 3\n  patience: null\n"

BROKEN_PLUGIN = '''
import peftbench

class Broken(peftbench.Method):
    name = "broken"
    knob = None
    budgeted = False
    inserts = "nothing: raises while injecting (a test plugin)"

    def param_count(self, cfg, spec):
        return 0

    def inject(self, backbone, cfg):
        raise RuntimeError("boom: this method is broken on purpose")

@peftbench.hookimpl
def register_methods(register):
    register(Broken)
'''


def make_env(root: Path, training: str = TRAINING) -> dict:
    """Tiny model folder, CSV task, and a suite file with fast training settings (``training``)."""
    model = make_tiny_model(root / "tiny-bert")
    data = make_sentiment_csv(root / "reviews.csv", rows=60)
    suite = root / "fast.yaml"
    suite.write_text(training)
    return {"root": root, "model": str(model), "data": str(data), "suite": str(suite)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("run"))


def base_args(env, out: Path, *extra: str) -> list[str]:
    return ["--config", env["suite"], "--backbone", env["model"], "--task", f"file:{env['data']}",
            "--text-column", "review", "--label-column", "sentiment", "--out", str(out), "--quiet", *extra]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    return main_run(parse(argv))


def rows(out: Path, suite: str):
    with Store(out / suite / "results.sqlite", create=False) as store:
        return store.records()


# -- planning ----------------------------------------------------------------------------------
def test_grid_expands_solves_and_ids_are_stable(env, registry):
    args = parse(base_args(env, env["root"] / "unused", "--methods", "lora,adapter,head,full",
                           "--budget", "5%,20%", "--seeds", "2"))
    plan = make_plan(resolve_suite(args, registry), registry)
    spec = next(iter(plan.specs.values()))
    # 2 baselines once per seed + 2 budgeted methods x 2 budgets per seed
    assert len(plan.trials) == (2 + 2 * 2) * 2 and all(t.matched for t in plan.trials)
    assert len({t.trial_id for t in plan.trials}) == len(plan.trials)
    for t in plan.trials:
        method = registry.method(t.method)
        assert t.lr == method.schedule_lr  # no lr given: each method's tuned rate, on the spec
        if method.budgeted:
            sol = peftbench.solve(method, method.config(), spec, t.budget)
            assert t.knob_value == sol.value and t.trainable_params == sol.params
            assert t.method_config[method.knob] == sol.value
            assert t.knob_step > 0 and t.target_params == sol.target and t.reference is None
        else:
            assert t.budget is None and t.knob_value is None and t.reference in ("ceiling", "floor")
    baselines = [t for t in plan.trials if t.method in ("head", "full")]
    assert sorted((t.method, t.seed) for t in baselines) == [("full", 0), ("full", 1), ("head", 0), ("head", 1)]
    again = make_plan(resolve_suite(args, registry), registry)
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in plan.trials]
    other_lr = make_plan(resolve_suite(parse([*base_args(env, env["root"], "--methods", "lora,adapter,head,full",
                                                         "--budget", "5%,20%", "--seeds", "2"), "--lr", "lora=0.1"]),
                                      registry), registry)
    changed = {t.method for t, u in zip(plan.trials, other_lr.trials) if t.trial_id != u.trial_id}
    assert changed == {"lora"}
    assert all(t.lr == 0.1 for t in other_lr.trials if t.method == "lora")


def test_an_unreachable_budget_trains_at_the_nearest_size_and_a_budget_nobody_reaches_is_an_error(env, registry):
    # on the tiny BERT, lora spans 0.9%..28.6% and houlsby 2.3%..30.4% of the parameters
    plan = make_plan(resolve_suite(parse(base_args(env, env["root"], "--methods", "lora,houlsby", "--budget", "1%")),
                                   registry), registry)
    by = {t.method: t for t in plan.trials}
    assert set(by) == {"lora", "houlsby"} and len(plan.trials) == 2
    assert by["lora"].matched and by["lora"].reachable
    houlsby = by["houlsby"]  # trained at its nearest feasible size (m=1), flagged and ranked apart
    assert not houlsby.matched and not houlsby.reachable and houlsby.knob_value == 1
    assert houlsby.trainable_params == registry.method("houlsby").param_count(
        registry.method("houlsby").config(houlsby.method_config), next(iter(plan.specs.values())))
    assert "not reachable" in houlsby.note and "m in 1.." in houlsby.note and "nearest feasible: m=1" in houlsby.note
    with pytest.raises(BudgetError, match=r"budget 50%.*none of the selected methods.*lora.*houlsby"):
        make_plan(resolve_suite(parse(base_args(env, env["root"], "--methods", "lora,houlsby,head", "--budget", "50%")),
                                registry), registry)


def test_a_pinned_size_runs_as_written_and_is_flagged(env, registry, tmp_path, capsys):
    suite = tmp_path / "pinned.yaml"
    suite.write_text(f"include: {env['suite']}\nmethods:\n  - {{name: houlsby, config: {{reduction_factor: 2}}}}\n"
                     "  - {name: lora, config: {r: 6}}\n  - pfeiffer\n")
    plan = make_plan(resolve_suite(parse([*base_args(env, tmp_path, "--budget", "5%"), "--config", str(suite)]),
                                   registry), registry)
    by = {t.method: t for t in plan.trials}
    assert by["houlsby"].pinned and by["houlsby"].method_config["reduction_factor"] == 2  # not replaced by the solver
    assert not by["houlsby"].matched and "outside the ±10% tolerance" in by["houlsby"].note
    assert "reduction_factor=2" in by["houlsby"].note
    assert by["lora"].pinned and by["lora"].matched and "within the ±10% tolerance" in by["lora"].note  # r=6 is 5%
    assert not by["pfeiffer"].pinned and by["pfeiffer"].matched
    assert len(plan.warnings) == 2 and all("pinned by the user" in w for w in plan.warnings)
    assert run([*base_args(env, tmp_path / "out", "--budget", "5%"), "--config", str(suite), "--dry-run"]) == 0
    assert "peftbench: note: houlsby at 5%: size pinned by the user" in capsys.readouterr().err


def test_dry_run_prints_the_grid_and_writes_nothing(env, tmp_path, capsys):
    out = tmp_path / "reports"
    assert run(base_args(env, out, "--methods", "lora,houlsby,head", "--budget", "1%,5%", "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "28,608 parameters without the task head" in text
    assert "| lora " in text and "r=6" in text  # 5% of 28,608 -> r=6 (1,536 params)
    assert "nearest size" in text and "houlsby at 1%: not reachable" in text
    assert "5 trials (0 already done, 5 to run), 1 not budget-matched" in text
    assert not out.exists()


def test_user_example_dry_run_on_minilm(tmp_path, capsys):
    """`peftbench run --methods adapter,lora --budget 3%`, as a dry run on the packaged backbone."""
    assert run(["--methods", "adapter,lora", "--budget", "3%", "--dry-run", "--quiet", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "houlsby" in text and "lora" in text and "movie_sentiment" in text
    assert "6 trials (0 already done, 6 to run)" in text  # 2 methods x 3 seeds


# -- running -----------------------------------------------------------------------------------
def test_run_writes_rows_artifacts_report_and_rerun_skips(env, tmp_path, capsys):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora,head", "--budget", "5%", "--seeds", "1", "--suite", "two")
    assert run(argv) == 0
    found = {r.spec.method: r for r in rows(out, "two")}
    assert set(found) == {"lora", "head"}
    for record in found.values():
        r = record.result
        assert record.status == "done", record.error
        assert r.steps == 3 and set(r.metrics) == {"accuracy", "macro_f1", "mcc"}
        assert 0 <= r.metrics["accuracy"] <= 1 and r.val_metrics["accuracy"] is not None
        assert r.best_step in (3,) and r.step_time_s > 0 and r.train_time_s > 0 and r.inference_overhead > 0
        assert r.planned_steps == 3 and r.last_eval_step == 3 and r.stopped_early is False
        # the CSV has no split column: validation and test were carved from train, and the result says so
        assert "carved from train (10% of each label, split seed 0)" in r.splits["validation"]
        assert r.splits["test"].startswith("read once, by this final trial: carved from train")
        assert r.chance["accuracy"] == pytest.approx(0.5, abs=0.2) and r.chance["mcc"] == 0  # one class, always
        assert r.peak_mem_bytes > 10 * 2**20 and r.mem_kind == "rss"
        assert record.spec.head_params == 66 and record.spec.base_params == 28_608
        assert r.environment["versions"]["torch"] == __import__("torch").__version__
        trial_dir = Path(r.artifacts)
        assert (trial_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((trial_dir / "curves.json").read_text())[-1]["step"] == 3
    lora = found["lora"]
    assert lora.spec.knob == "r" and lora.spec.knob_value == 6 and lora.spec.trainable_params == 1_536
    assert lora.result.stored_bytes >= 1_536 * 4 and found["head"].result.stored_bytes < 1_000
    report = (out / "two" / "report.md").read_text()
    assert "lora" in report and "head" in report
    info = json.loads((out / "two" / "suite.json").read_text())
    assert info["suite"] == "two" and "--methods lora,head" in info["command"]
    capsys.readouterr()

    before = {r.trial_id: r.finished_at for r in rows(out, "two")}
    started = time.perf_counter()
    assert run(argv) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert {r.trial_id: r.finished_at for r in rows(out, "two")} == before
    assert time.perf_counter() - started < 30  # nothing trained again
    assert run([*argv, "--dry-run"]) == 0
    assert "2 trials (2 already done, 0 to run)" in capsys.readouterr().out


def test_failed_and_diverged_trials_are_recorded_and_the_grid_goes_on(env, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text(BROKEN_PLUGIN)
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "broken,full,qlora", "--budget", "5%", "--seeds", "1", "--suite", "bad",
                     "--lr", "full=1e30")
    args = parse(argv)
    args.plugins_dir = str(plugins)  # `peftbench --plugins-dir DIR run ...`
    assert main_run(args) == 1  # a failed trial makes the exit status 1, after the report
    found = {r.spec.method: r for r in rows(out, "bad")}
    assert found["broken"].status == "failed"
    assert "RuntimeError: boom" in found["broken"].error
    assert "boom" in (Path(found["broken"].result.artifacts) / "error.txt").read_text()
    assert found["full"].status == "diverged" and "nan" in found["full"].error.lower()
    assert found["full"].result.steps is not None  # what the trial got before it diverged is kept
    qlora = found["qlora"]
    assert qlora.status == "done", qlora.error
    # the block linears of the tiny BERT hold 2 x (4 x 32x32 + 2 x 32x48) = 14,336 weights: in 4-bit that
    # is at least half a byte each (plus quantization constants), and far below their fp32 bytes
    cost = qlora.result.costs["4-bit weights"]
    assert cost.unit == "bytes" and 14_336 // 2 <= cost.value < 14_336 * 4
    report = (out / "bad" / "report.md").read_text()
    assert "boom" in report and "diverged" in report


def test_out_folder_of_a_different_suite_is_refused_untouched(env, tmp_path):
    out = tmp_path / "reports"
    assert run(base_args(env, out, "--methods", "head", "--seeds", "1", "--suite", "mine")) == 0
    files = {p: p.read_bytes() for p in (out / "mine").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"different suite.*training\.max_steps: 3 -> 4.*--suite NAME"):
        run(base_args(env, out, "--methods", "head", "--seeds", "1", "--suite", "mine", "--max-steps", "4"))
    assert {p: p.read_bytes() for p in (out / "mine").rglob("*") if p.is_file()} == files


def test_kill_9_mid_grid_loses_only_the_trial_in_flight(env, tmp_path):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "head,lora", "--budget", "5%", "--seeds", "2", "--suite", "killed",
                     "--max-steps", "8")
    db = out / "killed" / "results.sqlite"
    kill_9_run_when(argv, tmp_path, lambda: _statuses(db), lambda s: s.count("done") >= 1 and "running" in s, 120,
                    "a finished and a running trial")
    killed = {r.trial_id: r for r in rows(out, "killed")}
    done_before = {t: r.finished_at for t, r in killed.items() if r.status == "done"}
    in_flight = [t for t, r in killed.items() if r.status == "running"]
    assert len(in_flight) == 1

    assert run(argv) == 0
    after = {r.trial_id: r for r in rows(out, "killed")}
    assert len(after) == 4 and all(r.status == "done" for r in after.values())
    assert {t: after[t].finished_at for t in done_before} == done_before  # kept, not rerun
    assert after[in_flight[0]].attempts == 2


def _statuses(db: Path) -> list[str]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [r[0] for r in conn.execute("SELECT status FROM trials")]
    except sqlite3.OperationalError:  # the table is being created
        return []


def test_generation_trial_trains_on_the_target_only_and_decodes(tmp_path, registry):
    """A causal LM on e2e_nlg: loss masked on the source, validation and test by greedy decoding."""
    import torch

    from peftbench.results.records import TrainingSpec
    from peftbench.running.plan import trial_spec
    from peftbench.running.trial import load_trial_backbone
    from peftbench.tasks.data import encoded_data, raw_data, task_for
    from peftbench.tasks.entry import TaskEntry

    model = make_tiny_model(tmp_path / "tiny-gpt2", "gpt2", causal=True, positions=512)
    training = TrainingSpec(max_steps=2, batch_size=4, eval_batch_size=4, max_length=500, patience=None,
                            eval_every=2, train_limit=8, eval_limit=3, test_limit=3, max_new_tokens=4)
    entry = TaskEntry(name="e2e_nlg")
    task = task_for(entry, registry)
    raw_data(task, entry, training)
    backbone = load_trial_backbone(str(model), task, seed=0, device=torch.device("cpu"), registry=registry)
    row = encoded_data(task, entry, backbone, training)["train"][0]
    cut = row["labels"].count(-100)
    assert 0 < cut < len(row["input_ids"])
    assert row["labels"][cut:] == row["input_ids"][cut:]  # the target (and eos) is learned ...
    assert backbone.tokenizer.decode(row["input_ids"][:cut]).endswith("||")  # ... the source prompt is not
    assert row["input_ids"][-1] == backbone.tokenizer.eos_token_id

    spec = trial_spec(registry, task=entry, backbone=str(model), method="lora", method_config={"r": 2}, lr=1e-3,
                      training=training)
    assert spec.primary_metric == "bleu" and spec.head_params == 0
    outcome = execute_trial(spec, RunOptions(threads=1, quiet=True), str(tmp_path / "trial"), registry)
    assert outcome.status == "done", outcome.error
    result = outcome.result
    assert set(result.metrics) == {"bleu", "rouge_l"} and set(result.val_metrics) == {"bleu", "rouge_l"}
    assert all(0 <= v <= 100 for v in result.metrics.values())
    assert result.steps == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_classifier_pads_left_and_is_padding_invariant(tmp_path, arch, registry):
    """Decoders classify from the last token: left padding keeps it in place, so a padded row scores as alone."""
    import torch

    from peftbench.results.records import TrainingSpec
    from peftbench.running.train import collator
    from peftbench.running.trial import load_trial_backbone
    from peftbench.tasks.data import encoded_data, raw_data, task_for
    from peftbench.tasks.entry import TaskEntry

    model = make_tiny_model(tmp_path / arch, arch)
    data = make_sentiment_csv(tmp_path / "d.csv", rows=40)
    entry = TaskEntry(name=f"file:{data}", text_columns=["review"], label_column="sentiment")
    training = TrainingSpec(max_length=64)
    task = task_for(entry, registry)
    raw_data(task, entry, training)
    backbone = load_trial_backbone(str(model), task, seed=0, device=torch.device("cpu"), registry=registry)
    assert backbone.spec.is_decoder and backbone.tokenizer.padding_side == "left"
    rows = encoded_data(task, entry, backbone, training)["test"]
    rows = sorted((rows[i] for i in range(len(rows))), key=lambda r: len(r["input_ids"]))
    short, long = rows[0], rows[-1]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = collator(backbone.tokenizer, task.kind, backbone.model)([short, long])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # padded on the left
    assert batch["position_ids"][0, -1] == len(short["input_ids"]) - 1  # positions count real tokens only
    with torch.no_grad():
        together = backbone.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = backbone.model(input_ids=torch.tensor([short["input_ids"]])).logits
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-5)


def test_early_stopping_stops_after_patience_and_keeps_the_best(env, registry):
    """With a learning rate too small to change anything, validation never improves after step 1."""
    from peftbench.results.records import TrainingSpec
    from peftbench.running.plan import trial_spec
    from peftbench.tasks.entry import TaskEntry

    training = TrainingSpec(max_steps=10, eval_every=1, patience=2, batch_size=8, max_length=40,
                            train_limit=None, eval_limit=None, test_limit=None)
    entry = TaskEntry(name=f"file:{env['data']}", text_columns=["review"], label_column="sentiment")
    spec = trial_spec(registry, task=entry, backbone=env["model"], method="lora", method_config={"r": 2}, lr=1e-12,
                      training=training)
    outcome = execute_trial(spec, RunOptions(threads=1, quiet=True), None, registry)
    assert outcome.status == "done", outcome.error
    result = outcome.result
    assert result.steps == 3  # best at step 1, then 2 passes without improvement
    validated = [c for c in result.curves if c.val_metric is not None]
    assert [c.step for c in validated] == [1, 2, 3]
    assert result.val_metrics["accuracy"] == validated[0].val_metric and result.best_step == 1
    assert result.stopped_early and result.planned_steps == 10 and result.last_eval_step == 3


def test_search_trial_never_reads_test(env, registry):
    """A search trial is selected on validation: it computes no test metric, and the store refuses one."""
    from peftbench.results.records import TrainingSpec, TrialResult
    from peftbench.results.store import StoreError
    from peftbench.running.plan import trial_spec
    from peftbench.tasks.entry import TaskEntry

    entry = TaskEntry(name=f"file:{env['data']}", text_columns=["review"], label_column="sentiment")
    training = TrainingSpec(max_steps=2, eval_every=2, batch_size=8, max_length=40)
    spec = trial_spec(registry, task=entry, backbone=env["model"], method="lora", method_config={"r": 2},
                      training=training, role="search")
    final = spec.model_copy(update={"role": "final"})
    assert spec.trial_id != final.trial_id  # the role is part of what a trial is
    outcome = execute_trial(spec, RunOptions(threads=1, quiet=True), None, registry)
    assert outcome.status == "done", outcome.error
    assert outcome.result.metrics == {} and set(outcome.result.val_metrics) >= {"accuracy"}
    with Store(env["root"] / "search.sqlite") as store:
        store.start(spec)
        with pytest.raises(StoreError, match="search trial.*no test metric"):
            store.finish(spec.trial_id, TrialResult(metrics={"accuracy": 0.5}))
        store.finish(spec.trial_id, outcome.result)
        assert store.get(spec.trial_id).result.metrics == {}
