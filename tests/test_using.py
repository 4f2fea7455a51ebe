"""Using a trained adapter: ``peftbench.load`` -> predict, the predict/export commands, the safety checks
on loading, and exports that transformers and peft load (checked numerically, in a fresh interpreter
that cannot import peftbench).

One suite is trained once for the module (a tiny random BERT folder, a synthetic CSV task whose labels
are ``neg``/``pos``, three optimizer steps per trial): LoRA and Houlsby, seed 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftbench
from peftbench.cli import main
from peftbench.errors import ConfigError
from peftbench.using.export import CHECK_TEXTS, export
from run_helpers import make_tiny_model, train_tiny_suite

TRAINING = "seeds: 1\ntraining:\n  threads: 1\n  batch_size: 8\n  eval_batch_size: 32\n  max_length: 40\n" \
           "  max_steps: 3\n  eval_every: 3\n  patience: null\n"
TEXTS = ["the film was superb", "a dull and boring plot", "great acting", "weak"]
REGISTRY = peftbench.get_registry()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return train_tiny_suite(tmp_path_factory.mktemp("using"), TRAINING, "lora,houlsby", rows=48)


def adapter_dir(suite, method: str) -> Path:
    from peftbench.using.locate import find_trial, trial_adapter

    return trial_adapter(suite["dir"], find_trial(suite["dir"], method, registry=REGISTRY))


def big_deltas(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give the method's weights values far from their init (std ``scale``, many times the tiny models'
    weights), so an export that dropped them would show. Decoders take 0.1: a LLaMA causal LM's merged
    fp32 logits (over the vocabulary) differed by 8e-6 at 0.5, too near the 1e-5 tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.injection.named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter where importing peftbench (or its plugins) fails; its last line of
    stdout is JSON."""
    guard = "import sys; sys.modules['peftbench'] = None; sys.modules['peftbench_plugins'] = None\n"
    out = subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOGITS = """
import json, torch
tok = AutoTokenizer.from_pretrained(DIR)
enc = tok({texts!r}, padding=True, truncation=True, max_length=40, return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
print(json.dumps({{"logits": logits.tolist(), "id2label": getattr(model.config, "id2label", None)}}))
"""


# -- load and predict ------------------------------------------------------------------------
def test_load_names_labels_and_matches_the_trial_rebuilt_by_hand(suite):
    model = peftbench.load(suite["dir"], method="lora")
    assert model.labels == ("neg", "pos") and model.kind == "classification"
    preds = model.predict(TEXTS)
    assert [p.label in ("neg", "pos") for p in preds] == [True] * len(TEXTS)
    for p in preds:
        assert abs(sum(p.probs.values()) - 1) < 1e-5 and p.score == max(p.probs.values())
    # the same adapter reached by its trial folder and its adapter folder
    adapter = adapter_dir(suite, "lora")
    for path in (adapter.parent, adapter):
        assert torch.equal(peftbench.load(path).logits(TEXTS), model.logits(TEXTS))
    # by hand: backbone, the saved injection (method, config, weights, head) -> the same logits
    backbone = peftbench.load_backbone(str(suite["model"]), num_labels=2, registry=REGISTRY)
    plain = model.logits(TEXTS)
    injection = peftbench.load_injection(backbone, adapter, REGISTRY)
    enc = model.tokenizer(TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        by_hand = backbone.model(**enc).logits
    assert torch.allclose(by_hand, plain, atol=1e-6)
    injection.remove()
    with torch.no_grad():
        without = backbone.model(**enc).logits  # the saved head alone, no adapter: the adapter mattered
    assert (without - plain).abs().max() > 1e-6


def test_generate_on_a_classifier_and_predict_one_string_are_clear_errors(suite):
    model = peftbench.load(suite["dir"], method="houlsby")
    with pytest.raises(ConfigError, match="generate\\(\\) needs a generation model"):
        model.generate(["x"])
    with pytest.raises(ConfigError, match="not one string"):
        model.predict("one text")


# -- the command line --------------------------------------------------------------------------
def test_predict_command_texts_file_and_out(suite, tmp_path, capsys):
    assert main(["predict", str(suite["dir"]), "--method", "lora", "--seed", "0", *TEXTS[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = peftbench.load(suite["dir"], method="lora").predict(TEXTS[:2])
    assert [line.split("\t") for line in lines] == [[p.label, f"{p.score:.4f}", t] for p, t in zip(expected, TEXTS[:2])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "review": t}) + "\n" for i, t in enumerate(TEXTS)))
    assert main(["predict", str(suite["dir"]), "--method", "lora", "--file", str(src),  # the task's column: review
                 "--out", str(tmp_path / "preds.csv")]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["label"] for r in rows] == [p.label for p in peftbench.load(suite["dir"], method="lora").predict(TEXTS)]
    assert set(rows[0]) == {"id", "review", "label", "score", "prob_neg", "prob_pos"}


@pytest.mark.parametrize("argv,message", [
    (["--method", "lora", "--seed", "7", "x"], "no finished trial of method 'lora' has seed 7; it has: 0"),
    (["--method", "lora", "--budget", "1%", "x"], "no finished trial of method 'lora' has budget '1%'; it has: 5%"),
    (["--method", "prefix", "x"], "has no trial of method 'prefix'; it has: houlsby, lora"),
    (["--method", "lroa", "x"], "unknown method 'lroa' (did you mean 'lora'?)"),
    (["x"], "is a suite folder: name the trial's method"),
    (["--method", "lora", "--file", "in.txt"], "allowed kinds are .csv, .jsonl"),
    (["--method", "lora"], "nothing to predict"),
    (["--method", "lora", "--file", "MISSING.csv"], "--file MISSING.csv does not exist"),
    (["--method", "lora", "--text-column", "a,b", "x"], "reads one text per example: --text-column names one column"),
])
def test_predict_bad_input_is_one_clear_line(suite, argv, message, capsys):
    assert main(["predict", str(suite["dir"]), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_of_a_method_that_cannot_merge_is_refused(suite, tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["export", str(suite["dir"]), "--method", "houlsby", "--format", "merged", "--out", str(out)]) == 2
    assert "method 'houlsby' cannot merge" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(suite["dir"]), "--method", "houlsby", "--format", "peft", "--out", str(out)]) == 2
    assert "has no peft equivalent" in capsys.readouterr().err and not out.exists()


# -- safety: what differs is named -------------------------------------------------------------
@pytest.fixture
def adapter_copy(suite, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(adapter_dir(suite, "lora"), copy)
    return copy


def _edit_meta(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_unknown_format_version_and_missing_method(adapter_copy):
    _edit_meta(adapter_copy, format_version=99)
    with pytest.raises(ConfigError, match="format_version 99 is unknown; this peftbench reads adapter versions 0..1"):
        peftbench.load(adapter_copy)
    _edit_meta(adapter_copy, format_version=1, method="sparse_magic")
    with pytest.raises(ConfigError, match="saved by method 'sparse_magic', which is not installed here"):
        peftbench.load(adapter_copy)


def test_another_base_with_the_same_shapes_is_refused(suite, adapter_copy, tmp_path):
    other = tmp_path / "other-bert"
    shutil.copytree(suite["model"], other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(other / "model.safetensors"))
    _edit_meta(adapter_copy, backbone=str(other))
    with pytest.raises(ConfigError, match=f"trained on backbone '{other}' with weights sha256:.*loads with weights "
                                          "sha256:.*another base model"):
        peftbench.load(adapter_copy)


def test_missing_extra_and_misshaped_weights_are_named(adapter_copy):
    path = adapter_copy / "adapter_model.safetensors"
    good = load_file(str(path))
    lora_key = next(k for k in sorted(good) if "lora_A" in k)
    save_file({**good, "bert.encoder.layer.0.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConfigError, match="unexpected \\['bert.encoder.layer.0.extra.weight'\\]"):
        peftbench.load(adapter_copy)
    save_file({k: v for k, v in good.items() if k != lora_key}, str(path))
    with pytest.raises(ConfigError, match=f"missing \\['{lora_key}'\\]"):
        peftbench.load(adapter_copy)
    save_file({**good, lora_key: torch.zeros(good[lora_key].shape[0] + 1, good[lora_key].shape[1])}, str(path))
    with pytest.raises(ConfigError, match=f"other shapes than the injection \\({lora_key} saved"):
        peftbench.load(adapter_copy)
    save_file({**good, "head.classifier.weight": torch.zeros(3, 32), "head.classifier.bias": torch.zeros(3)}, str(path))
    with pytest.raises(ConfigError, match="saved head has other shapes .* a different number of labels"):
        peftbench.load(adapter_copy)


def test_a_format_0_adapter_takes_its_labels_from_the_suite(suite, tmp_path):
    """Trials saved before format 1 (no labels, no hash) load through their suite's store."""
    copy = tmp_path / "suite"
    shutil.copytree(suite["dir"], copy)
    trial = adapter_dir(suite, "lora").parent.name
    adapter = copy / "trials" / trial / "adapter"
    _edit_meta(adapter, format_version=None, labels=None, num_labels=None, task_kind=None, backbone_sha256=None,
               max_length=None, text_columns=None, task=None)
    model = peftbench.load(copy / "trials" / trial)
    assert model.labels == ("neg", "pos") and "format 0" in model.notes[0]
    assert torch.equal(model.logits(TEXTS), peftbench.load(suite["dir"], method="lora").logits(TEXTS))
    shutil.copytree(adapter, tmp_path / "alone")  # outside its suite nothing names its labels
    with pytest.raises(ConfigError, match="saved before adapters recorded their label names"):
        peftbench.load(tmp_path / "alone")


# -- exports, checked numerically --------------------------------------------------------------
def test_merged_export_loads_in_plain_transformers_with_equal_logits(suite, tmp_path):
    model = peftbench.load(suite["dir"], method="lora")
    big_deltas(model)
    meta = export(model, tmp_path / "merged", "merged")
    assert meta["max_abs_logit_diff"] <= 1e-5
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "peftbench.json"} <= files
    assert "adapter_config.json" not in files
    got = fresh_python(f"from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                       f"DIR = {str(tmp_path / 'merged')!r}\n"
                       f"model = AutoModelForSequenceClassification.from_pretrained(DIR).eval()\n"
                       + LOGITS.format(texts=TEXTS))
    diff = (torch.tensor(got["logits"]) - model.logits(TEXTS)).abs().max().item()
    assert diff <= 1e-5, diff
    assert got["id2label"] == {"0": "neg", "1": "pos"}
    again = peftbench.load(tmp_path / "merged")  # peftbench reads its own export too
    assert again.labels == ("neg", "pos") and (again.logits(TEXTS) - model.logits(TEXTS)).abs().max() <= 1e-5
    before = model.logits(TEXTS)
    plain = model.merge_and_unload()  # in memory: a plain transformers model, the Model left as it was
    assert not any("lora" in name or "base_layer" in name for name, _ in plain.named_parameters())
    enc = model.tokenizer(TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
    with torch.no_grad():
        assert (plain(**enc).logits - before).abs().max() <= 1e-5
    assert torch.equal(model.logits(TEXTS), before) and plain.config.id2label == {0: "neg", 1: "pos"}


def test_safetensors_export_is_the_adapter_alone_and_loads_onto_its_base(suite, tmp_path, capsys):
    """--format safetensors: method weights + head + metadata, no base; peftbench.load rebuilds it."""
    for method in ("lora", "houlsby"):
        model = peftbench.load(suite["dir"], method=method)
        big_deltas(model)
        meta = export(model, tmp_path / method, "safetensors")
        assert meta["max_abs_logit_diff"] <= 1e-6 and meta["export_format"] == "safetensors"
        files = {p.name for p in (tmp_path / method).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors"}  # no base, no peftbench.json
        saved = load_file(str(tmp_path / method / "adapter_model.safetensors"))
        assert any(k.startswith("head.") for k in saved) and sum(v.numel() for v in saved.values()) < 20_000
        again = peftbench.load(tmp_path / method)
        assert again.labels == ("neg", "pos") and again.method == method
        assert (again.logits(TEXTS) - model.logits(TEXTS)).abs().max() <= 1e-6
    assert main(["export", str(suite["dir"]), "--method", "lora", "--format", "safetensors", "--out",
                 str(tmp_path / "cli")]) == 0
    assert "lora (safetensors) ->" in capsys.readouterr().out


def test_deactivate_takes_the_adapter_off_and_set_adapter_puts_it_back(suite):
    model = peftbench.load(suite["dir"], method="lora")
    big_deltas(model)
    before = model.logits(TEXTS)
    from peftbench.backbones.fingerprint import fingerprint

    model.deactivate_adapter()
    assert model.active_adapter is None and model.injection is None
    assert not any("lora" in n for n, _ in model.backbone.model.named_parameters())
    assert fingerprint(model.backbone) == model.adapters["default"].meta["backbone_sha256"]  # the base, bit for bit
    with pytest.raises(ConfigError, match="needs an active adapter"):
        model.logits(TEXTS)
    model.set_adapter("default")  # what it held (big deltas included) comes back
    assert torch.equal(model.logits(TEXTS), before)


def test_peft_export_loads_with_auto_peft_model_with_equal_logits(suite, tmp_path):
    model = peftbench.load(suite["dir"], method="lora")
    big_deltas(model, seed=1)
    meta = export(model, tmp_path / "peft", "peft")
    assert meta["max_abs_logit_diff"] <= 1e-5
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["modules_to_save"]) == ("LORA", "SEQ_CLS", ["classifier"])
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    lora = model.injection.config
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (lora.r, lora.alpha, lora.dropout)
    code = (f"from peft import AutoPeftModelForSequenceClassification\nfrom transformers import AutoTokenizer\n"
            f"DIR = {str(tmp_path / 'peft')!r}\n"
            f"model = AutoPeftModelForSequenceClassification.from_pretrained(DIR).eval()\n")
    unloaded = "\nbase = logits\nmodel = model.unload()\n" + LOGITS.format(texts=TEXTS).replace(
        '"logits": logits.tolist()', '"logits": base.tolist(), "unloaded": logits.tolist()')
    got = fresh_python(code + LOGITS.format(texts=TEXTS) + unloaded)
    ours = model.logits(TEXTS)
    diff = (torch.tensor(got["logits"]) - ours).abs().max().item()
    assert diff <= 1e-5, diff
    assert (torch.tensor(got["unloaded"]) - ours).abs().max() > 1e-3  # peft really applied the LoRA weights


def test_export_refuses_a_folder_in_use(suite, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    model = peftbench.load(suite["dir"], method="lora")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export(model, tmp_path / "busy", "merged")
    with pytest.raises(ConfigError, match="export format 'onnx' is unknown; allowed: merged, peft"):
        export(model, tmp_path / "new", "onnx")


@pytest.mark.parametrize("arch,targets,kind", [
    ("gpt2", ["q", "v", "ffn_out"], "classification"),  # q, v: slices of the fused Conv1D c_attn
    ("llama", ["q", "k", "v"], "generation"),  # GQA k/v, a causal LM: logits over the vocabulary
])
def test_decoder_lora_exports_to_peft_and_merged(tmp_path, arch, targets, kind):
    from peftbench.using.load import build_backbone
    from peftbench.using.model import Model

    folder = make_tiny_model(tmp_path / arch, arch)
    labels = ("a", "b", "c") if kind == "classification" else ()
    backbone = build_backbone(str(folder), kind, len(labels), REGISTRY, torch.device("cpu"))
    injection = peftbench.apply(REGISTRY.method("lora"), backbone, {"r": 2, "alpha": 8, "targets": targets})
    model = Model(backbone.model, backbone.tokenizer, labels, kind=kind, max_length=40, backbone=backbone,
                  injection=injection, meta={"method": "lora", "config": injection.config.model_dump()})
    big_deltas(model, seed=2, scale=0.1)
    for fmt in ("peft", "merged"):
        meta = export(model, tmp_path / fmt, fmt, tolerance=1e-5)  # loaded back from disk and compared
        assert meta["max_abs_logit_diff"] <= 1e-5
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if kind == "classification" else "CAUSAL_LM")
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    if arch == "gpt2":  # one rank-2r LoRA per fused c_attn, alpha doubled: peft's alpha/rank stays alpha/r
        assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {16}
    reloaded = peftbench.load(tmp_path / "peft")
    assert reloaded.kind == kind


def test_a_generative_trial_loads_and_generates(tmp_path):
    """A causal-LM trial (tiny GPT-2, E2E NLG, two steps): ``generate`` continues prompts as the trial
    trained (its prompt template), the same as the merged export does; ``predict`` says to use generate."""
    from peftbench.results.records import TrainingSpec
    from peftbench.running.execute import execute_trial
    from peftbench.running.options import RunOptions
    from peftbench.running.plan import trial_spec
    from peftbench.tasks.entry import TaskEntry

    folder = make_tiny_model(tmp_path / "tiny-gpt2", "gpt2", causal=True, positions=512)
    training = TrainingSpec(max_steps=2, batch_size=4, eval_batch_size=4, max_length=500, patience=None,
                            eval_every=2, train_limit=8, eval_limit=3, test_limit=3, max_new_tokens=4)
    spec = trial_spec(REGISTRY, task=TaskEntry(name="e2e_nlg"), backbone=str(folder), method="lora",
                      method_config={"r": 2}, lr=1e-2, training=training)
    assert execute_trial(spec, RunOptions(threads=1, quiet=True), str(tmp_path / "trial"), REGISTRY).status == "done"
    model = peftbench.load(tmp_path / "trial")
    assert (model.kind, model.labels, model.max_length) == ("generation", (), 500)
    prompts = ["name[The Eagle], food[French]", "name[Aromi], area[city centre]"]
    out = model.generate(prompts, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    with pytest.raises(ConfigError, match="needs a classification model.*use generate\\(\\)"):
        model.predict(prompts)
    big_deltas(model, seed=3)
    export(model, tmp_path / "merged", "merged", tolerance=1e-5)
    assert peftbench.load(tmp_path / "merged").generate(prompts, max_new_tokens=5) == model.generate(prompts, max_new_tokens=5)


@pytest.mark.parametrize("arch,kind", [("bert", "classification"), ("gpt2", "classification"), ("llama", "generation")])
def test_prompt_tuning_exports_to_peft(tmp_path, arch, kind):
    """peft's prompt tuning prepends the same (n, d) prompt with the same mask and token types."""
    from peftbench.using.load import build_backbone
    from peftbench.using.model import Model

    folder = make_tiny_model(tmp_path / arch, arch)
    labels = ("a", "b") if kind == "classification" else ()
    backbone = build_backbone(str(folder), kind, len(labels), REGISTRY, torch.device("cpu"))
    injection = peftbench.apply(REGISTRY.method("prompt"), backbone, {"n": 3})
    model = Model(backbone.model, backbone.tokenizer, labels, kind=kind, max_length=40, backbone=backbone,
                  injection=injection, meta={"method": "prompt"})
    big_deltas(model, seed=4)
    meta = export(model, tmp_path / "peft", "peft", tolerance=1e-5)
    assert meta["max_abs_logit_diff"] <= 1e-5
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PROMPT_TUNING", 3)
    from transformers import AutoTokenizer  # a decoder classifier reads the last position: saved padded left

    assert AutoTokenizer.from_pretrained(tmp_path / "peft").padding_side == ("left" if arch == "gpt2" else "right")
    moved = tmp_path / "moved"
    (tmp_path / "peft").rename(moved)  # peftbench.load finds the base beside the adapter, wherever it is
    if kind == "classification":
        assert (peftbench.load(moved).logits(TEXTS) - model.logits(TEXTS)).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="method 'prompt' cannot merge"):
        export(model, tmp_path / "merged", "merged")


def _model_of(folder: Path, method: str, config: dict, kind: str = "classification"):
    """A ``Model`` of ``method`` injected (not trained) on the saved backbone ``folder``."""
    from peftbench.using.load import build_backbone
    from peftbench.using.model import Model

    labels = ("a", "b") if kind == "classification" else ()
    backbone = build_backbone(str(folder), kind, len(labels), REGISTRY, torch.device("cpu"))
    injection = peftbench.apply(REGISTRY.method(method), backbone, config)
    return Model(backbone.model, backbone.tokenizer, labels, kind=kind, max_length=40, backbone=backbone,
                 injection=injection, meta={"method": method, "config": injection.config.model_dump()})


PEFT_LOGITS = """
import json, torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, AutoTokenizer
DIR = {dir!r}
model = AutoPeftModelForSequenceClassification.from_pretrained(DIR).eval()
base = AutoModelForSequenceClassification.from_pretrained(DIR + "/base").eval()  # the base alone, with the head
{setup}
tok = AutoTokenizer.from_pretrained(DIR)
enc = tok({texts!r}, padding=True, truncation=True, max_length=40, return_tensors="pt")
with torch.no_grad():
    logits, base_logits = model(**enc).logits, base(**enc).logits
print(json.dumps({{"logits": logits.tolist(), "base": base_logits.tolist(),
                  "layers": [type(m).__name__ for m in model.modules()]}}))
"""


@pytest.mark.parametrize("arch,kind,encoder", [("bert", "classification", "mlp"), ("gpt2", "classification", "lstm"),
                                               ("llama", "generation", "mlp")])
def test_ptuning_exports_as_peft_p_tuning_with_its_encoder_output(tmp_path, arch, kind, encoder):
    """P-tuning's trained function is its encoder's output P prepended like prompt tuning's; peft saves its
    own P_TUNING the same way (``prompt_embeddings`` = the encoder's output, used as is in inference)."""
    model = _model_of(make_tiny_model(tmp_path / arch, arch), "ptuning", {"n": 3, "encoder": encoder, "hidden": 16},
                      kind)
    big_deltas(model, seed=6)
    before = model.logits(TEXTS) if kind == "classification" else None
    meta = export(model, tmp_path / "trained", "peft", tolerance=1e-5)  # the encoder still there
    assert meta["max_abs_logit_diff"] <= 1e-5
    model.injection.finalize()  # as a trial saves it: P kept, the encoder dropped
    assert export(model, tmp_path / "peft", "peft", tolerance=1e-5)["max_abs_logit_diff"] <= 1e-5
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["encoder_reparameterization_type"],
            config["encoder_hidden_size"], config["inference_mode"]) == ("P_TUNING", 3, encoder.upper(), 16, True)
    saved = {folder: load_file(str(tmp_path / folder / "adapter_model.safetensors"))["prompt_embeddings"]
             for folder in ("trained", "peft")}
    assert torch.equal(saved["peft"], model.injection.encoder.prompt.detach())
    assert torch.equal(saved["trained"], saved["peft"])
    if arch != "bert":  # loaded back by peft from disk above; one fresh interpreter shows it needs no peftbench
        return
    assert (model.logits(TEXTS) - before).abs().max() <= 1e-5
    got = fresh_python(PEFT_LOGITS.format(dir=str(tmp_path / "peft"), setup="", texts=TEXTS))
    assert (torch.tensor(got["logits"]) - before).abs().max() <= 1e-5
    assert (torch.tensor(got["base"]) - before).abs().max() > 1e-3  # the prompt is what changes the logits


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_is_peft_prompt_encoder_layer_for_layer(encoder):
    """The README's claim: with our weights, peft's own PromptEncoder computes our P exactly."""
    import peft
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

    from peftbench_plugins.ptuning import PromptEncoder

    torch.manual_seed(0)
    ours = PromptEncoder(n=5, d=24, hidden=16, encoder=encoder)
    config = peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=24,
                                      num_transformer_submodules=1, num_attention_heads=4, num_layers=2,
                                      encoder_hidden_size=16, encoder_reparameterization_type=encoder.upper())
    theirs = PeftPromptEncoder(config)
    state = {name.replace("lstm.", "lstm_head.").replace("mlp.", "mlp_head."): tensor
             for name, tensor in ours.state_dict().items()}  # embedding, lstm.*, mlp.* -> peft's names
    state["embedding.weight"] = state.pop("embedding")
    theirs.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(theirs(torch.arange(5).unsqueeze(0))[0], ours())


def _wide_bert(folder: Path) -> Path:
    """A 2-layer random BERT 64 wide (FFN 128): every weight row a whole number of 64-value NF4 blocks."""
    from transformers import AutoModel, BertConfig

    from run_helpers import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qlora_exports_to_peft_on_its_own_4bit_base(tmp_path):
    """The base is saved as QLoRA ran it: the same NF4 codes, with the quantization_config under which
    transformers loads them. peft's LoRA on it gives peftbench's logits exactly (with bitsandbytes'
    standard CPU path; its AVX512-BF16 inference kernel, where the CPU has one, is measured apart)."""
    import bitsandbytes as bnb
    model = _model_of(_wide_bert(tmp_path / "bert64"), "qlora", {"r": 2})
    big_deltas(model, seed=7, scale=0.1)
    with torch.no_grad():
        for p in model.backbone.head_parameters().values():
            p.normal_(0, 0.5)
    meta = export(model, tmp_path / "peft", "peft", tolerance=1e-5)
    assert meta["max_abs_logit_diff"] <= 1e-5
    assert ("max_abs_logit_diff_bnb_cpu_kernel" in meta) == bool(bnb.functional.has_avx512bf16())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], sorted(config["target_modules"]), config["fan_in_fan_out"]) == (
        "LORA", [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")], False)
    quant = json.loads((tmp_path / "peft" / "base" / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["load_in_4bit"], quant["bnb_4bit_quant_type"],
            quant["bnb_4bit_use_double_quant"], quant["bnb_4bit_compute_dtype"]) == (
        "bitsandbytes", True, "nf4", True, "float32")
    assert quant["llm_int8_skip_modules"] == ["bert.pooler.dense", "classifier"]  # not quantised by QLoRA
    base = load_file(str(tmp_path / "peft" / "base" / "model.safetensors"))
    query = model.backbone.model.bert.encoder.layer[0].attention.self.query.base_layer
    assert base["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.uint8
    assert torch.equal(base["bert.encoder.layer.0.attention.self.query.weight"], query.weight.data)  # the same codes
    ours = model.logits(TEXTS)
    standard_path = ("for m in [*model.modules(), *base.modules()]:  # not bitsandbytes' AVX512-BF16 kernel\n"
                     "    if hasattr(m, 'support_avx512bf16_for_cpu'):\n        m.support_avx512bf16_for_cpu = False")
    got = fresh_python(PEFT_LOGITS.format(dir=str(tmp_path / "peft"), setup=standard_path, texts=TEXTS))
    assert (torch.tensor(got["logits"]) - ours).abs().max() <= 1e-5
    assert got["layers"].count("Linear4bit") >= 12  # peft's LoRA sits on 4-bit layers
    assert (torch.tensor(got["base"]) - ours).abs().max() > 1e-3  # the LoRA weights and head were applied
    assert (peftbench.load(tmp_path / "peft").logits(TEXTS) - ours).abs().max() <= 1e-5


def test_qlora_export_refuses_layers_that_bitsandbytes_decodes_wrongly_on_cpu(tmp_path):
    """A 32-wide base: rows of half an NF4 block, which bitsandbytes 0.50.2's AVX512 CPU kernel decodes
    wrongly; peftbench decodes those in torch, a plain load cannot, so the export is refused where it
    differs (and kept where bitsandbytes decodes them right)."""
    import bitsandbytes  # noqa: F401 - a dependency (QLoRA)
    model = _model_of(make_tiny_model(tmp_path / "bert", "bert"), "qlora", {"r": 2})
    big_deltas(model, seed=8, scale=0.1)
    if any(getattr(m, "decodes_in_torch", False) for m in model.model.modules()):
        with pytest.raises(ConfigError, match="rows of partial quantisation blocks, which bitsandbytes' CPU kernel"):
            export(model, tmp_path / "peft", "peft", tolerance=1e-5)
        assert not (tmp_path / "peft").exists()
    else:
        assert export(model, tmp_path / "peft", "peft", tolerance=1e-5)["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("method", ["prefix", "ptuning_v2"])
def test_prefix_methods_have_no_peft_export(tmp_path, method):
    model = _model_of(make_tiny_model(tmp_path / "bert", "bert"), method, {"n": 3})
    with pytest.raises(ConfigError, match=f"method {method!r} has no peft equivalent"):
        export(model, tmp_path / "peft", "peft")


def test_peft_prefix_tuning_is_another_function(tmp_path):
    """Why prefix tuning and P-tuning v2 do not export (README): peft 0.21 refuses a transformers 5
    sequence classifier, and where it runs (a causal LM) its prefix sits in the cache, so the real tokens'
    positions start at n: ours given those shifted positions is what peft computes, ours is not."""
    import peft
    import transformers

    folder = make_tiny_model(tmp_path / "bert", "bert")
    classifier = peft.get_peft_model(transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                                     peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    enc = transformers.AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="Model does not support past key values"):
        classifier(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    model = _model_of(make_tiny_model(tmp_path / "gpt2", "gpt2"), "ptuning_v2", {"n": 3}, "generation")
    big_deltas(model, seed=9)
    table = model.injection.table.prefix.detach()  # (L, 2, kv_heads, n, head_dim)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         inference_mode=True)).eval()
    embedding = theirs.prompt_encoder["default"].embedding.weight
    enc = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    real = enc["attention_mask"].bool()
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        embedding.copy_(table.permute(3, 0, 1, 2, 4).reshape(embedding.shape))  # (n, L·2·kv_dim)
        got = theirs(**enc).logits[real]
        ours = model.model(**enc).logits[real]
        shifted = model.model(**enc, position_ids=positions + 3).logits[real]
    assert (got - shifted).abs().max() <= 1e-5
    assert (got - ours).abs().max() > 1e-2


# -- named adapters on one backbone ------------------------------------------------------------
def test_named_adapters_add_switch_save_remove(suite, tmp_path):
    from peftbench.backbones.fingerprint import fingerprint

    lora = peftbench.load(suite["dir"], method="lora")
    lora_logits = lora.logits(TEXTS)
    houlsby_logits = peftbench.load(suite["dir"], method="houlsby").logits(TEXTS)
    assert (lora.adapters.keys(), lora.active_adapter) == ({"default"}, "default")
    lora.add_adapter("houlsby", suite["dir"], method="houlsby")
    assert list(lora.adapters) == ["default", "houlsby"] and lora.active_adapter == "default"
    assert torch.equal(lora.logits(TEXTS), lora_logits)  # adding does not activate
    lora.set_adapter("houlsby")
    assert lora.method == "houlsby" and torch.equal(lora.logits(TEXTS), houlsby_logits)
    lora.set_adapter("default")
    assert lora.method == "lora" and torch.equal(lora.logits(TEXTS), lora_logits)
    lora.set_adapter("houlsby")
    saved = lora.save_adapter("houlsby", tmp_path / "h")
    assert torch.equal(peftbench.load(saved).logits(TEXTS), houlsby_logits)
    with pytest.raises(ConfigError, match="adapter name 'houlsby' is taken"):
        lora.add_adapter("houlsby", suite["dir"], method="houlsby")
    with pytest.raises(ConfigError, match="unknown adapter 'hulsby' \\(did you mean 'houlsby'\\?\\)"):
        lora.set_adapter("hulsby")
    lora.remove_adapter("houlsby")  # the active one: nothing is active, the backbone is the plain base again
    assert list(lora.adapters) == ["default"] and lora.active_adapter is None and lora.injection is None
    assert fingerprint(lora.backbone) == lora.meta["backbone_sha256"]
    with pytest.raises(ConfigError, match="needs an active adapter: set_adapter\\(name\\) with one of default"):
        lora.predict(TEXTS)
    lora.set_adapter("default")
    assert torch.equal(lora.logits(TEXTS), lora_logits)


def test_an_adapter_of_another_base_or_a_head_that_does_not_fit_is_not_added(suite, adapter_copy):
    """Another base is refused; another number of labels is not (the adapter brings its head, see
    test_named_heads.py), but a head of another hidden width is."""
    model = peftbench.load(suite["dir"], method="lora")
    _edit_meta(adapter_copy, backbone_sha256="sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match="adapter 'x' .* with weights sha256:0000.*another base model"):
        model.add_adapter("x", adapter_copy)
    _edit_meta(adapter_copy, backbone_sha256=model.meta["backbone_sha256"], labels=["a", "b", "c"], num_labels=3)
    weights = load_file(str(adapter_copy / "adapter_model.safetensors"))
    weights.update({"head.classifier.weight": torch.zeros(3, 16), "head.classifier.bias": torch.zeros(3)})
    save_file(weights, str(adapter_copy / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="adapter 'x' has a head for 3 labels \\['a', 'b', 'c'\\] that does not "
                                          "fit this backbone's head \\(classifier.weight saved \\(3, 16\\), "
                                          "backbone \\(3, 32\\)\\)"):
        model.add_adapter("x", adapter_copy)
    assert list(model.adapters) == ["default"]
    weights["head.classifier.weight"] = torch.zeros(3, 32)
    save_file(weights, str(adapter_copy / "adapter_model.safetensors"))
    model.add_adapter("x", adapter_copy)
    assert model.logits(TEXTS, adapter="x").shape == (len(TEXTS), 3) and model.labels == ("a", "b", "c")


@pytest.mark.parametrize("method,config", [("full", {}), ("topk", {"k": 1}), ("head", {})])
def test_baselines_that_train_the_backbone_itself_export_merged(tmp_path, method, config):
    from peftbench.using.load import build_backbone
    from peftbench.using.model import Model

    folder = make_tiny_model(tmp_path / "bert", "bert")
    backbone = build_backbone(str(folder), "classification", 2, REGISTRY, torch.device("cpu"))
    injection = peftbench.apply(REGISTRY.method(method), backbone, config)
    model = Model(backbone.model, backbone.tokenizer, ("a", "b"), max_length=40, backbone=backbone,
                  injection=injection, meta={"method": method})
    big_deltas(model, seed=5)
    with torch.no_grad():
        for p in backbone.head_parameters().values():
            p.normal_(0, 0.5)
    assert export(model, tmp_path / "merged", "merged", tolerance=1e-5)["max_abs_logit_diff"] <= 1e-5
    with pytest.raises(ConfigError, match=f"method {method!r} has no peft equivalent"):
        export(model, tmp_path / "peft", "peft")


def test_switching_between_every_insertion_mechanism_is_exact(tmp_path):
    """LoRA (module replacement), Houlsby (hooks, trained LayerNorms), prefix (key/value prefixes) and a
    soft prompt (an input hook) saved as adapters of one base: switching among them, twice round, gives
    each one's own logits, the same as loading it alone."""
    from peftbench.backbones.fingerprint import fingerprint
    from peftbench.using.load import build_backbone

    folder = make_tiny_model(tmp_path / "bert", "bert")
    methods = {"lora": {"r": 2}, "houlsby": {"m": 4}, "prefix": {"n": 3}, "prompt": {"n": 3}}
    alone = {}
    for name, config in methods.items():
        backbone = build_backbone(str(folder), "classification", 2, REGISTRY, torch.device("cpu"))
        metadata = {"task_kind": "classification", "labels": ["neg", "pos"], "num_labels": 2, "max_length": 40,
                    "backbone_sha256": fingerprint(backbone), "text_columns": ["text"]}
        injection = peftbench.apply(REGISTRY.method(name), backbone, config)
        with torch.no_grad():
            for p in [*injection.named_parameters().values(), *backbone.head_parameters().values()]:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        injection.finalize()
        injection.save(tmp_path / name, metadata=metadata)
        alone[name] = peftbench.load(tmp_path / name).logits(TEXTS)
    model = peftbench.load(tmp_path / "lora")
    for name in methods:
        if name != "lora":
            model.add_adapter(name, tmp_path / name)
    order = ["houlsby", "prefix", "prompt", "default", "prompt", "houlsby", "default", "prefix"]
    for name in order:
        model.set_adapter(name)
        assert torch.equal(model.logits(TEXTS), alone["lora" if name == "default" else name]), name
    model.remove_adapter(model.active_adapter)
    assert fingerprint(model.backbone) == model.meta["backbone_sha256"]  # the base is bit for bit the original


def test_a_suite_with_two_budgets_asks_for_one(suite, tmp_path):
    """The same LoRA trial stored again at another budget (a second real row of the store): the choice is
    asked for by name, and --budget picks one (written as the suite wrote it, or an equal spelling)."""
    from peftbench.results.store import Store
    from peftbench.using.locate import find_trial

    copy = tmp_path / "suite"
    shutil.copytree(suite["dir"], copy)
    with Store(copy / "results.sqlite", create=False) as store:
        record = find_trial(copy, "lora", registry=REGISTRY)
        spec = record.spec.model_copy(update={"budget": "10%"})
        store.start(spec)
        store.finish(spec.trial_id, record.result)
    with pytest.raises(ConfigError, match="the suite has method 'lora' at 2 budgets \\(10%, 5%\\): choose one with "
                                          "--budget"):
        find_trial(copy, "lora", registry=REGISTRY)
    assert find_trial(copy, "lora", budget="10.0%", registry=REGISTRY).trial_id == spec.trial_id
    assert find_trial(copy, "LoRA", budget="5%", registry=REGISTRY).trial_id == record.trial_id
