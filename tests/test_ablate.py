"""``peftbench ablate``: every span of layers switched off in trained trials, stored, drawn, cached.

One suite is trained once for the module (a tiny random 2-layer BERT folder, a synthetic CSV task, three
optimizer steps per trial): LoRA, Houlsby and prefix tuning (the three insertion mechanisms: module
replacement, hooks, key/value prefixes) and a soft prompt (nothing per-layer), two seeds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import peftbench
from peftbench.cli import main
from peftbench.results.ablation import ABLATION_FILE, by_group, mean_drops, read_ablation, spans
from peftbench.using.ablate import Validation
from run_helpers import train_tiny_suite

TRAINING = "seeds: 2\ntraining:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n" \
           "  max_steps: 3\n  eval_every: 3\n  patience: null\n  lr:\n    lora: 0.05\n    houlsby: 0.05\n" \
           "    prefix: 0.05\n"
REGISTRY = peftbench.get_registry()
PER_LAYER = ("houlsby", "lora", "prefix")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return train_tiny_suite(tmp_path_factory.mktemp("ablate"), TRAINING, "lora,houlsby,prefix,prompt", rows=60)


@pytest.fixture(scope="module")
def ablated(suite):
    assert main(["ablate", str(suite["dir"]), "--quiet"]) == 0
    return read_ablation(suite["dir"])


def test_every_span_of_every_per_layer_trial_is_stored(suite, ablated):
    entries = list(ablated["trials"].values())
    assert sorted((e["method"], e["seed"]) for e in entries) == [(m, s) for m in PER_LAYER for s in (0, 1)]
    for e in entries:
        assert e["layers"] == 2 and e["method_layers"] == [0, 1]
        assert sorted(e["spans"]) == ["0-0", "0-1", "1-1"] == sorted(f"{i}-{j}" for i, j in spans(2))
        assert all(0.0 <= v <= 1.0 for v in [e["baseline"], *e["spans"].values()])
        assert e["metric"] == "accuracy" and e["examples"] > 0
    assert sorted(e["method"] for e in ablated["not_per_layer"].values()) == ["prompt", "prompt"]


def test_baseline_is_the_trial_and_all_layers_off_is_the_plain_backbone_with_its_head(suite, ablated):
    """Recomputed by another path: the loaded trial as it is, and a fresh backbone that got only the head."""
    from peftbench.using.locate import find_trial

    for method in PER_LAYER:
        record = find_trial(suite["dir"], method, seed=1, registry=REGISTRY)
        entry = ablated["trials"][record.trial_id]
        model = peftbench.load(suite["dir"], method, seed=1, registry=REGISTRY)
        validation = Validation(record.spec, model.backbone, REGISTRY, torch.device("cpu"), 7)
        assert validation.score() == pytest.approx(entry["baseline"])
        head = {k: v.clone() for k, v in model.backbone.head_parameters().items()}
        model.injection.remove()  # the plain backbone, then the trained head alone on it
        params = dict(model.backbone.model.named_parameters())
        with torch.no_grad():
            for name, value in head.items():
                params[name].copy_(value)
        assert validation.score() == pytest.approx(entry["spans"]["0-1"])


def test_report_has_the_heatmap_and_the_section_and_rerenders_without_recomputing(suite, ablated, tmp_path):
    report = (suite["dir"] / "report.md").read_text()
    assert "## Ablation" in report and "### " in report.split("## Ablation")[1]
    assert "so not ablated: prompt." in report and "| prompt" not in report.split("## Ablation")[1]
    heatmaps = sorted(p.name for p in (suite["dir"] / "plots").glob("*ablation*.png"))
    assert len(heatmaps) == 1 and heatmaps[0].startswith("ablation-") and heatmaps[0].endswith("-5pct.png"), heatmaps
    assert f"](plots/{heatmaps[0]})" in report
    drops = mean_drops(next(iter(by_group(ablated).values()))["lora"])
    assert set(drops) == {"0-0", "0-1", "1-1"}
    # the report alone, in another folder: the section comes back from ablation.json
    assert main(["report", str(suite["dir"]), "--out", str(tmp_path)]) == 0
    again = (tmp_path / "s" / "report.md").read_text()
    assert again.split("## Ablation")[1] == report.split("## Ablation")[1]
    assert list((tmp_path / "s" / "plots").glob("ablation-*.png"))


def test_a_rerun_reuses_the_file_and_changed_weights_are_recomputed(suite, ablated, capsys):
    before = (suite["dir"] / ABLATION_FILE).read_text()
    assert main(["ablate", str(suite["dir"]), "--quiet", "--no-report"]) == 0
    assert "nothing to compute" in capsys.readouterr().out
    assert (suite["dir"] / ABLATION_FILE).read_text() == before
    # one trial's weights change (as if retrained): that trial alone is measured again
    from peftbench.using.locate import find_trial, trial_adapter

    record = find_trial(suite["dir"], "lora", seed=0, registry=REGISTRY)
    weights = trial_adapter(suite["dir"], record) / "adapter_model.safetensors"
    saved = weights.read_bytes()
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    for name in tensors:
        if "lora" in name:
            tensors[name] = tensors[name] * 0
    save_file(tensors, weights)
    try:
        assert main(["ablate", str(suite["dir"]), "--no-report", "--method", "lora"]) == 0
        out = capsys.readouterr()
        assert "ablated 1 trial(s)" in out.out
        assert "ablation: 100%" in out.err and "4/4" in out.err  # progress: the baseline and 3 spans
        entry = read_ablation(suite["dir"])["trials"][record.trial_id]
        assert set(entry["spans"].values()) == {entry["baseline"]}  # a zero LoRA update: nothing to switch off
    finally:
        weights.write_bytes(saved)
        assert main(["ablate", str(suite["dir"]), "--quiet", "--no-report", "--method", "lora"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--method", "pfeiffer"], "--method pfeiffer: no finished trial"),
    (["--budget", "3%"], "--budget '3%': no finished trial has it; the suite has: 5%"),
    (["--task", "nope"], "--task 'nope': no finished trial has it"),
    (["--batch-size", "0"], "--batch-size 0: give a positive number"),
    (["--threads", "0"], "--threads 0: give a positive number of torch CPU threads"),
])
def test_bad_selectors_are_one_clear_line(suite, argv, message, capsys):
    assert main(["ablate", str(suite["dir"]), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_not_a_suite_folder_and_a_broken_file(suite, tmp_path, capsys):
    assert main(["ablate", str(tmp_path)]) == 2
    assert "is not a suite folder" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(suite["dir"], copy)
    (copy / ABLATION_FILE).write_text(json.dumps({"format": 99}))
    assert main(["ablate", str(copy), "--quiet"]) == 2
    assert "not ablation results of format 1" in capsys.readouterr().err
