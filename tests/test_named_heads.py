"""Task adapters with their own heads on one backbone: switched per call (``adapter=``) and mixed in one batch
(``adapter_names=``), each text's output the same as its adapter loaded alone.

One session fixture trains the trials once, on MiniLM with the packaged tasks: LoRA on movie_sentiment
(negative/positive), trec (6 labels) and sms_spam (ham/spam), and Houlsby (a bottleneck adapter) on trec;
four optimizer steps of batch 4 each, seed 0. The last test needs no training: a tiny random BERT with a
LoRA, a Houlsby, a prefix and a soft-prompt adapter of 2, 3, 4 and 5 labels, mixed in one call.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import peftbench
from peftbench.errors import ConfigError
from peftbench.running.runner import add_run_arguments, main_run
from run_helpers import make_tiny_model

TRAINING = ("seeds: 1\ntraining:\n  threads: 1\n  batch_size: 4\n  eval_batch_size: 8\n  max_length: 32\n"
            "  max_steps: 4\n  eval_every: 4\n  patience: null\n  train_limit: 16\n  eval_limit: 8\n  test_limit: 8\n")
REGISTRY = peftbench.get_registry()
TEXTS = ["A gorgeous, moving film.", "What is the capital of Peru?", "WINNER! Claim your free prize now, call 0800",
         "Two hours of my life I will never get back.", "How many feet are in a mile?", "ok see you at 7 then",
         "Who wrote Hamlet?", "The plot is thin but the acting is superb."]
#: the name each adapter is added under; "movie" is the one the model is loaded with ("default")
TASKS = {"movie": "movie_sentiment", "trec": "trec", "sms": "sms_spam"}
LABELS = {"movie": ("negative", "positive"), "trec": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
          "sms": ("ham", "spam"), "trec_houlsby": ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")}
#: one adapter per text, every adapter more than once, LoRA and Houlsby side by side
NAMES = ["movie", "trec_houlsby", "sms", "movie", "trec", "sms", "trec_houlsby", "trec"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The four trials (two suites), and each adapter loaded alone: its logits on TEXTS and on its own rows of
    the mixed batch (the same rows, in the same order, as the mixed call runs it on)."""
    root = tmp_path_factory.mktemp("named-heads")
    (root / "tiny.yaml").write_text(TRAINING)

    def run(suite: str, tasks: str, method: str) -> Path:
        parser = argparse.ArgumentParser()
        add_run_arguments(parser)
        args = parser.parse_args(["--config", str(root / "tiny.yaml"), "--backbone", "minilm", "--task", tasks,
                                  "--methods", method, "--out", str(root / "out"), "--suite", suite, "--quiet"])
        assert main_run(args) == 0
        return root / "out" / suite

    lora, houlsby = run("lora", ",".join(TASKS.values()), "lora"), run("houlsby", "trec", "houlsby")
    where = {name: (lora, {"method": "lora", "task": task}) for name, task in TASKS.items()}
    where["trec_houlsby"] = (houlsby, {"method": "houlsby"})
    alone, own_rows = {}, {}
    for name, (suite, selectors) in where.items():
        model = peftbench.load(suite, **selectors)
        assert model.labels == LABELS[name]
        alone[name] = model.logits(TEXTS)
        own_rows[name] = model.logits([t for t, n in zip(TEXTS, NAMES) if n == name])
        del model
    return {"root": root, "where": where, "alone": alone, "own_rows": own_rows}


def on_one_backbone(trained) -> peftbench.Model:
    """movie_sentiment's LoRA loaded (active, as "default" and nothing else), the other three added by name."""
    suite, selectors = trained["where"]["movie"]
    model = peftbench.load(suite, **selectors)
    for name, (suite, selectors) in trained["where"].items():
        if name != "movie":
            model.add_adapter(name, suite, **selectors)
    return model


def alias(name: str) -> str:
    return "movie" if name == "default" else name


def base_tensors(model) -> dict[str, torch.Tensor]:
    """The base model's own parameters by their plain names (a replaced module keeps its weight as
    ``base_layer``), without the active method's own."""
    own = {id(p) for p in model.injection.added_parameters().values()}
    return {n.replace(".base_layer.", "."): p for n, p in model.backbone.base_model.named_parameters()
            if id(p) not in own}


def test_task_adapters_with_their_own_heads_switch_per_call_on_one_base(trained):
    from peftbench.backbones.fingerprint import fingerprint

    model = on_one_backbone(trained)
    backbone, hf, base = model.backbone, model.model, base_tensors(model)
    ptrs = {n: p.data_ptr() for n, p in base.items()}
    assert len(base) > 90 and list(model.adapters) == ["default", "trec", "sms", "trec_houlsby"]
    # trec's six-label head and sms_spam's own two (other names) on the MiniLM that movie_sentiment's is on
    for name in ["trec", "sms", "default", "trec_houlsby", "trec", "default", "sms"]:
        got = model.logits(TEXTS, adapter=name)
        assert (got - trained["alone"][alias(name)]).abs().max() <= 1e-6, name
        labels = LABELS[alias(name)]
        assert model.active_adapter == name and model.labels == labels and got.shape == (len(TEXTS), len(labels))
        assert hf.config.num_labels == len(labels) and hf.config.id2label == dict(enumerate(labels))
        assert backbone.spec.head_params == sum(p.numel() for p in backbone.head_parameters().values())
        assert [p.label in labels for p in model.predict(TEXTS[:3], adapter=name)] == [True] * 3
        # the base is the same tensors throughout: nothing reloaded, only the head's output layer swapped
        assert model.backbone is backbone and model.model is hf
        now = base_tensors(model)
        assert now.keys() == base.keys() and all(now[n] is base[n] and now[n].data_ptr() == ptrs[n] for n in base)
    # the active adapter runs without naming it (adapter= leaves it active); the adapters really differ
    assert (model.logits(TEXTS) - trained["alone"]["sms"]).abs().max() <= 1e-6
    assert (trained["alone"]["movie"] - trained["alone"]["sms"]).abs().max() > 1e-4
    assert (trained["alone"]["trec"] - trained["alone"]["trec_houlsby"]).abs().max() > 1e-4
    model.remove_adapter("sms")  # no adapter on: the base's weights are bit for bit what the trials trained on
    assert fingerprint(model.backbone) == model.meta["backbone_sha256"]


def test_one_batch_of_texts_naming_different_adapters(trained, monkeypatch):
    import peftbench.using.named as named

    model = on_one_backbone(trained)
    model.set_adapter("sms")
    activations, forwards = [], []
    real_activate = named.activate
    monkeypatch.setattr(named, "activate", lambda m, stored: (activations.append(stored.source),
                                                               real_activate(m, stored))[1])
    hook = model.model.register_forward_hook(lambda module, args, out: forwards.append(len(out.logits)))
    names = [n if n != "movie" else "default" for n in NAMES]
    mixed = model.logits(TEXTS, adapter_names=names)
    hook.remove()
    # in the input order, each text's logits its adapter alone gives (the same rows, as each group runs)
    assert [tuple(row.shape) for row in mixed] == [(len(LABELS[n]),) for n in NAMES]
    for name in LABELS:
        rows = torch.stack([row for row, n in zip(mixed, NAMES) if n == name])
        assert (rows - trained["own_rows"][name]).abs().max() <= 1e-6, name
    for i, (row, name) in enumerate(zip(mixed, NAMES)):  # and what the whole batch alone gives, row by row
        assert (row - trained["alone"][name][i]).abs().max() <= 1e-5, (i, name)
    # a batching API: one activation and one forward pass per distinct adapter, the active one (sms) last
    assert len(activations) == 4 and activations[-1] == model.adapters["sms"].source
    assert sorted(forwards) == [2, 2, 2, 2] and model.active_adapter == "sms" and model.labels == LABELS["sms"]
    # predict names each text by its own adapter's labels
    preds = model.predict(TEXTS, adapter_names=names)
    for p, row, name in zip(preds, mixed, NAMES):
        assert p.label == LABELS[name][int(row.argmax())] and list(p.probs) == list(LABELS[name])
        assert abs(p.score - row.softmax(-1).max().item()) < 1e-6
    assert model.predict([], adapter_names=[]) == [] and model.active_adapter == "sms"


def test_bad_adapter_names_and_another_base_are_one_clear_line(trained, tmp_path):
    model = on_one_backbone(trained)

    def refused(call, message):
        with pytest.raises(ConfigError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)

    refused(lambda: model.predict(TEXTS, adapter_names=["default"] * 3),
            f"adapter_names has 3 names for {len(TEXTS)} texts: give one adapter name per text")
    refused(lambda: model.logits(TEXTS[:2], adapter_names=["default", "trek"]),
            "adapter_names: unknown adapter 'trek' \\(did you mean 'trec'\\?\\); known: default, sms, trec, "
            "trec_houlsby")
    refused(lambda: model.predict(TEXTS[:1], adapter_names="trec"), "adapter_names takes a list of adapter names")
    refused(lambda: model.predict(TEXTS[:1], adapter="trec", adapter_names=["trec"]), "not both")
    refused(lambda: model.predict(TEXTS[:1], adapter="sns"), "unknown adapter 'sns' \\(did you mean 'sms'\\?\\)")
    assert model.active_adapter == "default" and model.labels == LABELS["movie"]  # nothing switched
    # another base (same name and shapes, other weights) is still refused, with or without another head
    suite, selectors = trained["where"]["trec"]
    from peftbench.using.locate import find_trial, trial_adapter

    other = tmp_path / "other"
    shutil.copytree(trial_adapter(suite, find_trial(suite, registry=REGISTRY, **selectors)), other)
    meta = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**meta, "backbone_sha256": "sha256:" + "0" * 64}))
    refused(lambda: model.add_adapter("other", other),
            "adapter 'other' .* with weights sha256:0000.*, this model's backbone .* has sha256:.*: another base "
            "model")
    assert list(model.adapters) == ["default", "trec", "sms", "trec_houlsby"]


def test_every_insertion_mechanism_with_its_own_head_in_one_call(tmp_path):
    """LoRA, Houlsby, prefix and soft-prompt adapters of 2, 3, 4 and 5 labels on one tiny BERT: per call and
    mixed, each text gets its adapter's own logits, the same as loading that adapter alone; a head that does
    not fit the backbone at its number of labels is refused when added."""
    from peftbench.backbones.fingerprint import fingerprint
    from peftbench.using.load import build_backbone

    folder = make_tiny_model(tmp_path / "bert", "bert")
    texts = ["the film was superb", "a dull and boring plot", "great acting", "weak", "fun", "so very bad"]
    methods = {"lora": {"r": 2}, "houlsby": {"m": 4}, "prefix": {"n": 3}, "prompt": {"n": 3}}
    alone = {}
    for k, (name, config) in enumerate(methods.items()):
        labels = [f"{name}{i}" for i in range(2 + k)]
        backbone = build_backbone(str(folder), "classification", len(labels), REGISTRY, torch.device("cpu"))
        metadata = {"task_kind": "classification", "labels": labels, "num_labels": len(labels), "max_length": 40,
                    "backbone_sha256": fingerprint(backbone), "text_columns": ["text"]}
        injection = peftbench.apply(REGISTRY.method(name), backbone, config)
        with torch.no_grad():
            for p in [*injection.named_parameters().values(), *backbone.head_parameters().values()]:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.3)
        injection.finalize()
        injection.save(tmp_path / name, metadata=metadata)
        alone[name] = peftbench.load(tmp_path / name).logits(texts)
    model = peftbench.load(tmp_path / "lora")
    for name in methods:
        if name != "lora":
            model.add_adapter(name, tmp_path / name)
    for name in ["prompt", "houlsby", "default", "prefix"]:
        assert torch.equal(model.logits(texts, adapter=name), alone["lora" if name == "default" else name]), name
    names = ["houlsby", "default", "prompt", "prefix", "prompt", "houlsby"]
    for i, (row, name) in enumerate(zip(model.logits(texts, adapter_names=names), names)):
        assert (row - alone["lora" if name == "default" else name][i]).abs().max() <= 1e-6, (i, name)
    assert model.active_adapter == "prefix"
    # a head of another hidden width does not fit, whatever its number of labels
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "houlsby", bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    weights["head.classifier.weight"] = torch.zeros(3, 31)
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="adapter 'bad' has a head for 3 labels \\['houlsby0', 'houlsby1', "
                                          "'houlsby2'\\] that does not fit this backbone's head "
                                          "\\(classifier.weight saved \\(3, 31\\), backbone \\(3, 32\\)\\)"):
        model.add_adapter("bad", bad)
