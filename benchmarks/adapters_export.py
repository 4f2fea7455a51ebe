"""Export trained Houlsby / Pfeiffer adapters to the adapters library's folder format and check them.

    python benchmarks/adapters_export.py SUITE --out DIR --adapters-python /path/to/venv/bin/python
    python benchmarks/adapters_export.py SUITE --methods houlsby --budget 1% --seed 0 --out DIR

SUITE is a suite folder (or one trial folder) with trained ``houlsby`` / ``pfeiffer`` trials on a
BERT-layout backbone. Per method, ``DIR/<method>/`` gets what ``model.save_adapter`` of adapters 1.3
writes, built from our saved weights (nothing of the library is imported here):

- ``adapter_config.json``: a bottleneck config (``BnConfig``) that computes what ours does, see
  ``bn_config``; ``pytorch_adapter.bin`` (what ``load_adapter`` reads by default) and
  ``adapter.safetensors`` (``use_safetensors=True``): down/up weights under the library's names;
- ``head_config.json`` + ``pytorch_model_head.bin`` / ``model_head.safetensors``: our classifier as a
  one-layer classification head on the pooled output (BertForSequenceClassification's own head);
- ``layer_norms.safetensors`` when the method trained the block's LayerNorms (Houlsby does): their
  format has no place for them (see the README, "Use the winner"), so they travel beside it under the
  base model's parameter names, for ``model.load_state_dict(load_file(...), strict=False)``.

With ``--adapters-python`` (an environment with ``adapters``; it pins transformers 4.57, so it never
enters ours: see benchmarks/README.md) the same file runs there as ``--check SPEC``: it loads the base
with ``AutoAdapterModel``, calls ``load_adapter(folder, set_active=True)`` (weights and head), and
compares the logits with peftbench's on a few texts tokenized once here, before and after loading
the LayerNorms. It prints max |logit difference| per method and file format. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

#: the adapters library's format this writes (``version`` in its JSON files; it also stops the
#: loader from renaming "gelu" to "gelu_new", which it does for files without a version)
ADAPTERS_FORMAT = "adapters.1.3.0"
#: our site -> the adapters library's location key of a bottleneck config
LOCATIONS = {"attn_out": "mh_adapter", "ffn_out": "output_adapter"}
#: our activation names -> transformers' ACT2FN names (which the adapters library uses)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
#: texts the check runs on (one per label-ish, different lengths so padding is exercised)
TEXTS = ("a quietly moving film with a superb cast", "dull, loud and far too long",
         "What is the tallest mountain in Africa?", "WIN a free prize now, reply YES to claim",
         "I expected little and it still managed to disappoint me in every possible way, from the "
         "wooden dialogue to the ending that made no sense at all.", "fine")


# -- the export (peftbench's environment) ---------------------------------------------------------
def reduction_factor(d: int, m: int) -> float:
    """The library sizes the bottleneck as int(d // reduction_factor): a factor that gives exactly m."""
    for factor in (d / m, d / (m + 0.5)):
        if int(d // factor) == m:
            return factor
    raise ValueError(f"no reduction factor gives m = {m} at width {d}")


def bn_config(method, cfg, spec) -> dict:
    """Our bottleneck as the adapters library's ``BnConfig`` (fields that define the computation).

    Ours: on a sub-layer's output projection h (before the block's dropout, residual add and
    LayerNorm), h -> h + W_up act(W_down h + b_down) + b_up, then LayerNorm(dropout(.) + x).
    Theirs with ``original_ln_before=False, residual_before_ln=True, original_ln_after=True``: the
    adapter takes the sub-layer output h (after the block's dropout), adds h back, then
    LayerNorm(. + x): the same in evaluation (dropout is the identity); in training theirs drops out
    h before the adapter reads it and not the adapter's output. Their Pfeiffer preset
    (``SeqBnConfig``) is ``original_ln_before=True`` (the adapter reads LayerNorm(h + x) and the
    LayerNorm runs twice): another function, so ours exports with ``original_ln_before=False``.
    """
    d, m = spec.hidden, method.width(cfg, spec)
    layers = method.layer_indices(cfg, spec)
    return {
        "mh_adapter": "attn_out" in method.sites,
        "output_adapter": "ffn_out" in method.sites,
        "reduction_factor": reduction_factor(d, m),
        "non_linearity": ACTIVATIONS[cfg.non_linearity],
        "original_ln_before": False,
        "original_ln_after": True,
        "residual_before_ln": True,
        "adapter_residual_before_ln": False,
        "ln_before": False,
        "ln_after": False,
        "is_parallel": False,
        "scaling": 1.0,
        "use_gating": False,
        "dropout": 0.0,
        "phm_layer": False,
        "inv_adapter": None,
        "inv_adapter_reduction_factor": None,
        "cross_adapter": False,
        "leave_out": [i for i in range(spec.layers) if i not in layers],
        "init_weights": "bert",  # how a fresh adapter starts; a loaded one is overwritten
        "stochastic_depth": 0.0,
    }


def convert(model) -> tuple[dict, dict, dict, dict, dict]:
    """(adapter config, adapter weights, head config, head weights, trained base weights) of a loaded
    peftbench Houlsby/Pfeiffer ``Model``, under the adapters library's names."""
    from peftbench.contract.injection import ATTACH_PREFIX

    injection, backbone = model.injection, model.backbone
    method, cfg, spec = injection.method, injection.config, backbone.spec
    if spec.model_type != "bert":
        raise SystemExit(f"adapters_export: knows the adapters library's module names for BERT only, "
                         f"not {spec.model_type!r}")
    unknown = set(method.sites) - set(LOCATIONS)
    if unknown:
        raise SystemExit(f"adapters_export: method {method.name!r} adapts {sorted(unknown)}, which the "
                         f"adapters library's bottleneck config has no location for")
    name = method.name
    state = {k: v.detach().cpu().contiguous() for k, v in injection.state_dict().items()}
    weights: dict = {}
    for i in method.layer_indices(cfg, spec):
        for site in method.sites:
            ours = f"{backbone.layer_path(i)}.{ATTACH_PREFIX}{name}_{site}"
            # BERT: the adapter lives in the module that holds the projection, its dropout and LayerNorm
            # (BertSelfOutput for attn_out, BertOutput for ffn_out)
            theirs = backbone.site(i, site).path.rsplit(".", 1)[0] + f".adapters.{name}"
            for part, their_part in (("down", "adapter_down.0"), ("up", "adapter_up")):
                for p in ("weight", "bias"):
                    weights[f"{theirs}.{their_part}.{p}"] = state.pop(f"{ours}.{part}.{p}")
    base = dict(backbone.model.named_parameters())
    foreign = sorted(k for k in state if k not in base)
    if foreign:
        raise SystemExit(f"adapters_export: weights neither mapped nor base parameters: {foreign[:5]}")
    config = {"config": bn_config(method, cfg, spec), "hidden_size": spec.hidden, "model_class": "BertAdapterModel",
              "model_name": None, "model_type": spec.model_type, "name": name, "version": ADAPTERS_FORMAT}
    head = backbone.head_parameters()
    if sorted(head) != ["classifier.bias", "classifier.weight"]:
        raise SystemExit(f"adapters_export: expected BertForSequenceClassification's classifier, got {sorted(head)}")
    labels = list(model.labels)
    head_config = {
        "config": {"head_type": "classification", "num_labels": len(labels), "layers": 1, "activation_function": None,
                   "label2id": {label: i for i, label in enumerate(labels)}, "use_pooler": True, "bias": True,
                   "dropout_prob": None},
        "hidden_size": spec.hidden, "model_class": "BertAdapterModel", "model_name": None,
        "model_type": spec.model_type, "name": name, "version": ADAPTERS_FORMAT,
    }
    # one dropout then one linear layer: the head's Linear is its module "1"
    head_weights = {f"heads.{name}.1.{p}": head[f"classifier.{p}"].detach().cpu().contiguous()
                    for p in ("weight", "bias")}
    return config, weights, head_config, head_weights, state


def export(args) -> None:
    import torch
    from safetensors.torch import save_file

    import peftbench
    from peftbench.backbones.assets import resolve_source

    out = Path(args.out)
    cases = []
    encoding = None
    for method in args.methods.split(","):
        model = peftbench.load(args.path, method=method, budget=args.budget, seed=args.seed)
        config, weights, head_config, head_weights, base_weights = convert(model)
        source = resolve_source(model.backbone.name)
        config["model_name"] = head_config["model_name"] = source
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        torch.save(weights, folder / "pytorch_adapter.bin")
        save_file(weights, str(folder / "adapter.safetensors"))
        (folder / "head_config.json").write_text(json.dumps(head_config, indent=2, sort_keys=True) + "\n")
        torch.save(head_weights, folder / "pytorch_model_head.bin")
        save_file(head_weights, str(folder / "model_head.safetensors"))
        norms = folder / "layer_norms.safetensors"
        if base_weights:
            save_file(base_weights, str(norms))
        else:
            norms.unlink(missing_ok=True)  # an earlier export's into the same folder
            norms = None
        # one tokenization for both sides: what peftbench's Model feeds its model
        enc = model.tokenizer(list(TEXTS), truncation=True, max_length=model.max_length, padding=True,
                              return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if encoding is None:
            encoding = {k: v.tolist() for k, v in enc.items()}
        elif encoding != {k: v.tolist() for k, v in enc.items()}:
            raise SystemExit("adapters_export: the methods' tokenizers differ; export them one at a time")
        with torch.no_grad():
            logits = model.model(**enc).logits.float()
        same = (logits - model.logits(list(TEXTS))).abs().max().item()  # Model.logits batches the same texts
        model.injection.remove()  # the base restored bit for bit (trained LayerNorms too), the head kept
        with torch.no_grad():
            effect = (model.model(**enc).logits.float() - logits).abs().max().item()
        cfg = config["config"]
        print(f"{method}: m = {model.injection.method.width(model.injection.config, model.backbone.spec)}, "
              f"reduction_factor {cfg['reduction_factor']:.6g}, {cfg['non_linearity']}, "
              f"mh_adapter {cfg['mh_adapter']}, "
              f"output_adapter {cfg['output_adapter']}, leave_out {cfg['leave_out']}; "
              f"{len(weights)} adapter tensors, {len(base_weights)} trained base tensors -> {folder}"
              + (f" (peftbench logits vs Model.logits: {same:.1e})" if same else ""))
        cases.append({"method": method, "folder": str(folder), "layer_norms": str(norms) if norms else None,
                      "base": source, "logits": logits.tolist(), "without_adapter": effect})
    if not args.adapters_python:
        print("not checked: pass --adapters-python (an environment with the adapters library)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"encoding": encoding, "cases": cases}))
        run = subprocess.run([args.adapters_python, __file__, "--check", str(spec)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"adapters_export: the check failed in {args.adapters_python}:\n{run.stderr[-4000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"checked with {', '.join(f'{k} {v}' for k, v in result['versions'].items())}, "
          f"{len(TEXTS)} texts; max |logit difference| against peftbench:")
    print(f"{'method':<10} {'weights file':<22} {'load_adapter':>13} {'+ layer_norms':>14} {'(no adapter)':>13}")
    effects = {case["method"]: case["without_adapter"] for case in cases}
    for row in result["rows"]:
        with_norms = "-" if row["with_layer_norms"] is None else f"{row['with_layer_norms']:.2e}"
        print(f"{row['method']:<10} {row['file']:<22} {row['load_adapter']:>13.2e} {with_norms:>14} "
              f"{effects[row['method']]:>13.2e}")
    print("(no adapter): peftbench's base and head without the adapter, the scale a wrong load would show")
    for note in result["notes"]:
        print(note)


# -- the check (the adapters library's environment: adapters, transformers 4.57, torch) -----------
def check(path: str) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file

    import adapters
    from adapters import AutoAdapterModel

    transformers.logging.set_verbosity_error()
    spec = json.loads(Path(path).read_text())
    enc = {k: torch.tensor(v) for k, v in spec["encoding"].items()}
    rows, notes = [], []
    for case in spec["cases"]:
        ours = torch.tensor(case["logits"])
        for file, safetensors in (("pytorch_adapter.bin", False), ("adapter.safetensors", True)):
            model = AutoAdapterModel.from_pretrained(case["base"])
            info: dict = {}
            name = model.load_adapter(case["folder"], set_active=True, use_safetensors=safetensors, loading_info=info)
            model.eval()
            if info.get("missing_keys") or info.get("unexpected_keys"):
                notes.append(f"{case['method']} ({file}): load_adapter reported {info}")
            if model.active_head != name:
                notes.append(f"{case['method']} ({file}): active head {model.active_head!r}, not {name!r}")
            with torch.no_grad():
                plain = model(**enc).logits
            with_norms = None
            if case["layer_norms"]:
                result = model.load_state_dict(load_file(case["layer_norms"]), strict=False)
                if result.unexpected_keys:
                    notes.append(f"{case['method']}: LayerNorm tensors the model lacks: {result.unexpected_keys[:5]}")
                with torch.no_grad():
                    with_norms = (model(**enc).logits - ours).abs().max().item()
            rows.append({"method": case["method"], "file": file, "load_adapter": (plain - ours).abs().max().item(),
                         "with_layer_norms": with_norms})
    versions = {"adapters": adapters.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    print(json.dumps({"rows": rows, "notes": notes, "versions": versions}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        return check(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a suite folder (or a trial folder) with trained houlsby/pfeiffer trials")
    p.add_argument("--methods", default="houlsby,pfeiffer")
    p.add_argument("--budget", default=None, help="when the suite has several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder; gets one adapters-library folder per method")
    p.add_argument("--adapters-python", default=None, help="python of an environment with the adapters library")
    export(p.parse_args())


if __name__ == "__main__":
    main()
