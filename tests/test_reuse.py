"""The selected search trial is its group's first final seed: evaluated on test, not trained again.

A search trial is seeded like the group's first final seed and trains under the final schedule, so
retraining it as the final trial would repeat its numbers; the runner reuses its adapter instead.
Checked here by training that final trial afresh and comparing.
"""

from __future__ import annotations

import pytest

from peftbench.running.options import RunOptions
from peftbench.running.trial import run_trial
from test_runner import base_args, env, rows, run  # noqa: F401 - env is a fixture


def test_the_selected_search_trial_becomes_seed_0_and_retraining_it_gives_the_same_numbers(env, tmp_path, registry):
    out = tmp_path / "reports"
    argv = base_args(env, out, "--methods", "lora,houlsby", "--budget", "5%", "--seeds", "2", "--search-trials", "2",
                     "--search-pruner", "none", "--max-steps", "6", "--train-limit", "64", "--eval-limit", "32",
                     "--test-limit", "32", "--eval-every", "3", "--suite", "r")
    assert run(argv) == 0
    records = rows(out, "r")
    assert all(r.status == "done" for r in records)
    for method in ("lora", "houlsby"):
        search = [r for r in records if r.spec.method == method and r.spec.role == "search"]
        finals = {r.spec.seed: r for r in records if r.spec.method == method and r.spec.role == "final"}
        best = max(search, key=lambda r: (r.result.val_metrics["accuracy"], -r.spec.search_index))
        reused, other = finals[0], finals[1]
        assert reused.result.environment["reused_search_trial"] == best.trial_id
        assert "reused_search_trial" not in other.result.environment
        assert reused.spec.lr == best.spec.lr and reused.spec.seed == best.spec.seed
        assert reused.result.val_metrics == best.result.val_metrics and reused.result.curves == best.result.curves
        assert reused.result.steps == best.result.steps and set(reused.result.metrics) >= {"accuracy", "mcc"}
        assert best.result.metrics == {} and reused.result.chance  # the search trial itself never read test
        # its examples are the search trial's and the test split it read; its costs, and the machine's load while
        # they were measured, the search trial's
        assert set(best.result.examples) == {"train", "validation"}
        assert reused.result.examples == {**best.result.examples, "test": other.result.examples["test"]}
        assert (reused.result.load_start, reused.result.load_end) == (best.result.load_start, best.result.load_end)
        assert (out / "r" / "trials" / reused.trial_id / "adapter" / "adapter_model.safetensors").is_file()
        fresh = run_trial(reused.spec, RunOptions(threads=1, quiet=True), None, registry)
        assert fresh.val_metrics == pytest.approx(reused.result.val_metrics, abs=1e-9)
        assert fresh.metrics == pytest.approx(reused.result.metrics, abs=1e-9)
        assert fresh.best_step == reused.result.best_step and fresh.examples == reused.result.examples
    text = (out / "r" / "report.md").read_text()
    assert "2 final trials are their selected search trial" in text
