"""Gradient checkpointing: every registered method (prefix tuning's and P-tuning v2's key/value path included)
gets the same gradients with transformers' non-reentrant checkpointing as without it, with the layers really
recomputed; the switch reaches the Trainer from YAML, a method entry and ``--gradient-checkpointing``; a suite
that trains a method both ways shows peak memory and step time side by side in its report.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import peftbench
from conftest import batch_for, tiny_backbone
from peftbench.results.records import TrainingSpec
from peftbench.running.runner import add_run_arguments, main_run, resolve_suite
from peftbench.running.train import training_arguments
from run_helpers import make_sentiment_csv, make_tiny_model
from peftbench.testing.checks import perturb
from peftbench.testing.conformance import configured
from peftbench.testing.tiny import labels_for

REGISTRY = peftbench.get_registry()


def loss_of(backbone, batch, labels):
    return backbone.model(**batch, labels=labels).loss

METHODS = sorted(REGISTRY.methods)


def _grads(backbone, batch, labels, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = backbone.model
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    loss_of(backbone, batch, labels).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", METHODS)
def test_checkpointed_gradients_equal_plain_ones(name, arch):
    method = REGISTRY.method(name)
    backbone = tiny_backbone(arch)
    injection = peftbench.apply(method, backbone, configured(method, backbone.spec))
    perturb(injection)
    model = backbone.model
    model.train()
    for module in model.modules():  # dropout off: the two passes compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = batch_for(backbone, batch=3)
    labels = labels_for(backbone, batch)
    calls = []
    inside = backbone.site(0, "attention").module  # inside the checkpointed block: run again in backward
    handle = inside.register_forward_hook(lambda *a: calls.append(1))
    plain = _grads(backbone, batch, labels, checkpointing=False)
    plain_calls, calls[:] = len(calls), []
    checkpointed = _grads(backbone, batch, labels, checkpointing=True)
    handle.remove()
    assert plain_calls == 1 and len(calls) == 2, "checkpointing recomputes the layer in the backward pass"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain) == set(checkpointed) == trainable, "every trained parameter gets a gradient, both ways"
    assert any(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=f"{name} {arch}: {n}")
    model.activation_checkpointing_disable()
    injection.remove()


def test_the_switch_reaches_the_trainer_and_off_keeps_trial_ids():
    on = training_arguments(TrainingSpec(gradient_checkpointing=True), 1e-3, 0, 10, torch.device("cpu"), "fp32", "/tmp")
    off = training_arguments(TrainingSpec(), 1e-3, 0, 10, torch.device("cpu"), "fp32", "/tmp")
    prefix = "activation" if hasattr(on, "activation_checkpointing") else "gradient"
    assert getattr(on, f"{prefix}_checkpointing") and getattr(on, f"{prefix}_checkpointing_kwargs") == {"use_reentrant": False}
    assert not getattr(off, f"{prefix}_checkpointing")
    assert TrainingSpec(gradient_checkpointing=False) == TrainingSpec()  # false is off, stored as unset
    assert "gradient_checkpointing" not in TrainingSpec().model_dump(exclude_none=True)


def _args(env, *extra):
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(["--config", str(env["suite"]), "--backbone", str(env["model"]), "--task",
                              f"file:{env['data']}", "--text-column", "review", "--label-column", "sentiment",
                              "--out", str(env["root"] / "out"), "--quiet", *extra])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    suite = root / "gc.yaml"
    suite.write_text("seeds: 1\nbudgets: ['5%']\nmethods:\n  - houlsby\n  - {name: houlsby, gradient_checkpointing: true}\n"
                     "  - ptuning_v2\n  - {name: ptuning_v2, gradient_checkpointing: true}\n"
                     "training:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n"
                     "  max_steps: 3\n  eval_every: 3\n  patience: null\n")
    return {"root": root, "suite": suite, "model": make_tiny_model(root / "tiny-bert"),
            "data": make_sentiment_csv(root / "reviews.csv", rows=48)}


def test_flag_and_entries_set_it_per_trial(env, registry):
    from peftbench.running.plan import make_plan

    everything = resolve_suite(_args(env, "--gradient-checkpointing", "--methods", "lora"), registry)
    assert everything.training.gradient_checkpointing is True
    plan = make_plan(resolve_suite(_args(env), registry), registry)
    on = {t.display: bool(t.training.gradient_checkpointing) for t in plan.trials}
    assert on == {"houlsby (defaults)": False, "houlsby (gradient checkpointing)": True,
                  "ptuning_v2 (defaults)": False, "ptuning_v2 (gradient checkpointing)": True}
    # the trial without checkpointing is the trial of a suite that never names it: same id, reused
    plain_suite = env["root"] / "plain.yaml"
    plain_suite.write_text("\n".join(line for line in env["suite"].read_text().splitlines()
                                     if "gradient_checkpointing" not in line) + "\n")
    plain = make_plan(resolve_suite(_args({**env, "suite": plain_suite}), registry), registry)
    assert {t.trial_id for t in plain.trials} == {t.trial_id for t in plan.trials if "defaults" in t.display}


def test_a_suite_with_both_reports_memory_and_step_time_side_by_side(env):
    assert main_run(_args(env, "--suite", "both")) == 0
    report = (env["root"] / "out" / "both" / "report.md").read_text()
    section = report.split("## Gradient checkpointing")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| houlsby") or line.startswith("| ptuning_v2")]
    assert len(rows) == 2, section
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "1" and all(c != "—" for c in cells[2:11]), row  # memory, added, step time, both ways
    assert "gradient checkpointing on (houlsby (defaults), ptuning_v2 (defaults): off)" in report  # the Setup
