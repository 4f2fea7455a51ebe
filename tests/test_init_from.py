"""Two-stage training (``init_from``): a trial starts from a trained adapter of the same method and size.

A source suite is trained once (a tiny random BERT, a synthetic sentiment CSV, LoRA and Houlsby at
5%, 3 steps, seeds 0 and 1); target suites start from it on a second CSV.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import peftbench
from peftbench.errors import ConfigError
from peftbench.results.store import Store
from peftbench.running.config import validate_suite
from peftbench.running.plan import make_plan
from peftbench.running.runner import add_run_arguments, main_run
from run_helpers import make_sentiment_csv, make_tiny_model

TRAINING = "training:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n" \
           "  max_steps: 3\n  eval_every: 3\n  patience: null\n"
REGISTRY = peftbench.get_registry()


def _run(root, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return main_run(parser.parse_args(["--config", str(root / "fast.yaml"), "--backbone", str(root / "tiny-bert"),
                                       "--text-column", "review", "--label-column", "sentiment", "--out",
                                       str(root / "out"), "--quiet", *argv]))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    make_tiny_model(root / "tiny-bert")
    make_sentiment_csv(root / "a.csv", rows=48, seed=0)
    make_sentiment_csv(root / "b.csv", rows=48, seed=1)
    (root / "fast.yaml").write_text(TRAINING)
    assert _run(root, ["--task", f"file:{root / 'a.csv'}", "--methods", "lora,houlsby", "--budget", "5%",
                       "--seeds", "2", "--suite", "src"]) == 0
    return root


def _records(root, suite: str):
    with Store(root / "out" / suite / "results.sqlite", create=False) as store:
        return store.records()


def _suite(root, **fields):
    data = {"tasks": [{"name": f"file:{root / 'b.csv'}", "text_columns": ["review"], "label_column": "sentiment"}],
            "backbones": [str(root / "tiny-bert")], "budgets": ["5%"], "seeds": 2, "suite": "t",
            "training": {"max_steps": 3, "eval_every": 3, "patience": None, "max_length": 40}}
    return validate_suite({**data, **fields})


def test_a_trial_starts_from_the_source_of_its_own_seed(source):
    """With a learning rate too small to move anything, the trained adapter is the source's."""
    argv = ["--task", f"file:{source / 'b.csv'}", "--methods", "lora,houlsby", "--budget", "5%", "--seeds", "2",
            "--suite", "two", "--init-from", str(source / "out" / "src"), "--lr", "lora=1e-12",
            "--lr", "houlsby=1e-12"]
    assert _run(source, argv) == 0
    src = {(r.spec.method, r.spec.seed): r for r in _records(source, "src")}
    two = _records(source, "two")
    assert len(two) == 4 and all(r.done for r in two)
    for r in two:
        assert r.spec.variant == "init_from=src"
        assert r.spec.init_from["source"].startswith(f"trial {src[(r.spec.method, r.spec.seed)].trial_id} ")
        started = load_file(f"{r.result.artifacts}/adapter/adapter_model.safetensors")
        origin = load_file(f"{src[(r.spec.method, r.spec.seed)].result.artifacts}/adapter/adapter_model.safetensors")
        body = [k for k in origin if not k.startswith("head.")]
        assert body and set(body) <= set(started)
        for k in body:
            assert torch.allclose(started[k], origin[k], atol=1e-6), k
        # the head is the target task's own (fresh), not the source's
        heads = [k for k in origin if k.startswith("head.")]
        assert any(not torch.allclose(started[k], origin[k]) for k in heads)
    # seeds 0 and 1 start from different sources; a rerun trains nothing
    assert len({r.spec.init_from["weights_sha256"] for r in two if r.spec.method == "lora"}) == 2
    assert _run(source, argv) == 0
    assert sorted(r.finished_at for r in _records(source, "two")) == sorted(r.finished_at for r in two)
    text = (source / "out" / "two" / "report.md").read_text()  # the report names each row's start
    assert "**Two-stage training**" in text and "lora (init_from=src): seed 0 from trial " in text
    assert "(adapter; task head fresh)" in text


def test_scratch_and_init_are_two_rows_with_two_ids(source):
    suite = _suite(source, methods=["lora", {"name": "lora", "init_from": {"path": str(source / "out" / "src"),
                                                                            "head": True}}])
    plan = make_plan(suite, REGISTRY)
    assert [t.variant for t in plan.trials] == ["defaults", "init_from=src +head"] * 2
    scratch, init = plan.trials[0], plan.trials[1]
    assert scratch.trial_id != init.trial_id and scratch.method_config == init.method_config
    assert init.init_from["task_head"] is True and not scratch.init_from
    # the folder does not enter the id: the same weights elsewhere are the same trial
    assert "path" not in init.identity()["init_from"]


def test_mismatches_are_refused_before_training(source, tmp_path):
    src = str(source / "out" / "src")
    with pytest.raises(ConfigError, match=r"init_from .*another config than this trial's \(.*r: source \d+, "
                                          r"this trial \d+"):
        make_plan(_suite(source, methods=[{"name": "lora", "init_from": {"path": src, "budget": "5%"}}],
                         budgets=["2%"]), REGISTRY)
    with pytest.raises(ConfigError, match=r"init_from .*is a 'lora' adapter; this trial trains 'houlsby'"):
        make_plan(_suite(source, methods=[{"name": "houlsby", "init_from": {"path": src, "method": "lora"}}]),
                  REGISTRY)
    with pytest.raises(ConfigError, match=r"init_from .*no finished trial of method 'lora' has seed 5"):
        make_plan(_suite(source, seeds=[5], methods=[{"name": "lora", "init_from": src}]), REGISTRY)
    three = tmp_path / "three.csv"
    with open(three, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(48):
            writer.writerow([f"text number {i} " + "abc"[i % 3], "xyz"[i % 3]])
    suite = _suite(source, methods=[{"name": "lora", "init_from": {"path": src, "head": True}}])
    suite.tasks[0] = suite.tasks[0].model_copy(update={"name": f"file:{three}"})
    with pytest.raises(ConfigError, match=r"head: true, but .*'s head has 2 labels \['neg', 'pos'\]; this task has 3"):
        make_plan(suite, REGISTRY)


def test_a_source_changed_after_planning_is_refused_when_the_trial_runs(source, tmp_path):
    import shutil

    copy = tmp_path / "adapter"
    record = next(r for r in _records(source, "src") if r.spec.method == "lora" and r.spec.seed == 0)
    shutil.copytree(f"{record.result.artifacts}/adapter", copy)
    suite = _suite(source, seeds=1, methods=[{"name": "lora", "init_from": str(copy)}])
    plan = make_plan(suite, REGISTRY)
    meta = json.loads((copy / "adapter_config.json").read_text())
    assert plan.trials[0].init_from["source"] == str(copy) and meta["method"] == "lora"
    weights = load_file(str(copy / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in weights.items()}, str(copy / "adapter_model.safetensors"))
    from peftbench.running.options import RunOptions
    from peftbench.running.trial import run_trial

    with pytest.raises(ConfigError, match="changed since the trial was planned"):
        run_trial(plan.trials[0], RunOptions(), None, REGISTRY)
