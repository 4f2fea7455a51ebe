"""``export``: a trained adapter in the field's formats, checked against peftbench's own outputs.

- ``merged``: a plain transformers folder (config with ``id2label``, safetensors weights, tokenizer)
  that ``AutoModelForSequenceClassification.from_pretrained(DIR)`` (``AutoModelForCausalLM`` for a
  generative trial) loads without peftbench; for methods whose ``merge()`` folds everything into the
  base weights (``Method.mergeable``).
- ``safetensors``: the adapter alone, as a trial keeps it (``adapter_config.json`` with its metadata:
  method, config, labels, the base's name and weights hash; ``adapter_model.safetensors``: the method's
  weights and the task head), without the base: ``peftbench.load(DIR)`` puts it on that base anywhere.
- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` under peft's names (the method's
  ``Method.peft_adapter``), the task head in ``modules_to_save``, the base model in ``DIR/base``
  (``base_model_name_or_path`` is its absolute path, so it loads offline), the tokenizer beside it:
  ``peft.AutoPeftModelForSequenceClassification.from_pretrained(DIR)`` loads it. A method that runs
  the base in 4 bits (``PeftAdapter.base_quantization``) gets that 4-bit base, saved as it ran, with
  its ``quantization_config``.

Both are written to a temporary folder, loaded back from disk by transformers (or peft) and compared
with peftbench's outputs on a few texts; only a folder within ``tolerance`` becomes ``DIR``. A 4-bit
base is compared as peftbench runs its own 4-bit layers (``peftbench.quant.keep_one_format``); on a
CPU where bitsandbytes would switch to its bfloat16 inference kernel, that kernel's difference is
measured too and recorded (``max_abs_logit_diff_bnb_cpu_kernel``).
``peftbench.json`` beside them records what it is (method, config, backbone and its weights' hash,
labels, format versions): ``peftbench.load(DIR)`` reads it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from peftbench.backbones.quant import keep_one_format
from peftbench.errors import ConfigError
from peftbench.using.load import ADAPTER_ONLY, EXPORT_CHOICES, EXPORT_FORMAT_VERSION
from peftbench.using.locate import EXPORT_META
from peftbench.using.merge import auto_class, merged_model, plain_model, save_quantized_base
from peftbench.using.model import Model

#: texts the exported model is checked on (any text works: the check compares two computations)
CHECK_TEXTS = ("a quietly moving film with a superb cast", "dull, loud and far too long",
               "What is the tallest mountain in Africa?", "WIN a free prize now, reply YES to claim")
BASE = "base"

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "generation": "CAUSAL_LM"}


@torch.no_grad()
def outputs(model: torch.nn.Module, tokenizer, texts, max_length: int) -> torch.Tensor:
    """Logits of ``model`` on ``texts`` (a classifier's, or a causal LM's per position), float32 on CPU."""
    device = next(model.parameters()).device
    texts = list(texts)
    args = ([a for a, _ in texts], [b for _, b in texts]) if isinstance(texts[0], tuple) else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    model.eval()
    return model(**enc).logits.float().cpu()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer with its padding side (decoder classifiers read the last position: left)."""
    side = tokenizer.init_kwargs.get("padding_side")
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
    try:
        tokenizer.save_pretrained(folder)
    finally:
        if side is None:
            tokenizer.init_kwargs.pop("padding_side", None)
        else:
            tokenizer.init_kwargs["padding_side"] = side


def _meta(model: Model, fmt: str, diff: float) -> dict:
    keep = ("method", "config", "backbone", "model_type", "backbone_sha256", "task", "text_columns", "trial_id")
    return {"export_format": fmt, "export_format_version": EXPORT_FORMAT_VERSION,
            **{k: model.meta[k] for k in keep if k in model.meta},
            "adapter_format_version": model.meta.get("format_version", 0), "task_kind": model.kind,
            "labels": list(model.labels), "num_labels": len(model.labels), "max_length": model.max_length,
            "max_abs_logit_diff": diff, "source": model.source}


def _write_merged(model: Model, folder: Path) -> None:
    plain = merged_model(model)
    plain.save_pretrained(folder)
    save_tokenizer(model.tokenizer, folder)


def _write_peft(model: Model, folder: Path) -> None:
    from safetensors.torch import save_file

    method = model.injection.method
    adapter = method.peft_adapter(model.injection)
    if adapter is None:
        raise ConfigError(f"method {method.name!r} has no peft equivalent (its peft_adapter gives none): "
                          f"export it with --format merged if it merges, else use peftbench.load")
    if adapter.base_quantization is None:
        plain_model(model).save_pretrained(folder / BASE)  # the unmerged base, with the trained head
    else:
        save_quantized_base(model, adapter.base_quantization, folder / BASE)
    save_tokenizer(model.tokenizer, folder / BASE)
    save_tokenizer(model.tokenizer, folder)
    head = {name: p.detach().cpu().contiguous() for name, p in model.backbone.head_parameters().items()}
    config = {**adapter.config, "task_type": PEFT_TASK_TYPES[model.kind], "inference_mode": True,
              "base_model_name_or_path": str((folder / BASE).resolve())}
    if head:
        config["modules_to_save"] = sorted({name.split(".")[0] for name in head})
    tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in adapter.tensors.items()}
    tensors.update({adapter.head_prefix + k: v for k, v in head.items()})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_adapter(model: Model, folder: Path) -> None:
    from peftbench.using.named import Stored, current_state, save

    save(Stored(dict(model.meta), current_state(model), model.labels, model.kind, model.max_length, model.source),
         folder)


def _load_back(folder: Path, fmt: str, kind: str) -> torch.nn.Module:
    if fmt == ADAPTER_ONLY:  # read back as a user would, onto a freshly loaded base
        from peftbench.using.load import load

        return load(folder).model
    if fmt == "merged":
        return auto_class(kind).from_pretrained(folder)
    try:
        import peft
    except ImportError:
        raise ConfigError("--format peft checks the export by loading it with peft, which is not installed: "
                          "pip install peft") from None
    auto = peft.AutoPeftModelForCausalLM if kind == "generation" else peft.AutoPeftModelForSequenceClassification
    with warnings.catch_warnings():  # peft 0.21 calls a transformers API that warns of its own deprecation
        warnings.simplefilter("ignore", FutureWarning)
        return auto.from_pretrained(folder)


def bnb_cpu_kernel_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """bitsandbytes 4-bit layers of ``model`` that, on this CPU, would repack themselves on their first
    evaluation for bitsandbytes' AVX512-BF16 kernel (bfloat16 block statistics); peftbench's own 4-bit
    layers never do (``keep_one_format``)."""
    if next(model.parameters()).device.type != "cpu":
        return []
    return [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]


def _retarget(folder: Path) -> None:
    """Point a peft export's base_model_name_or_path at the folder's final place."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str((folder / BASE).resolve())
    path.write_text(json.dumps(config, indent=2) + "\n")


def export(model: Model, out: str | Path, fmt: str = "merged", *, tolerance: float = 1e-4,
           texts=CHECK_TEXTS) -> dict:
    """Write ``model`` (loaded from a trial) to ``out`` as ``fmt``; return what ``peftbench.json`` records
    (``max_abs_logit_diff``: exported against peftbench on ``texts``, at most ``tolerance``)."""
    from peftbench.backbones.backbone import quiet_transformers

    if fmt not in EXPORT_CHOICES:
        raise ConfigError(f"export format {fmt!r} is unknown; allowed: {', '.join(EXPORT_CHOICES)}")
    if model.injection is None:
        raise ConfigError(f"export takes a model loaded from a trial; {model.source} is already an export")
    method = model.injection.method
    if fmt == "merged" and not method.mergeable:
        raise ConfigError(f"method {method.name!r} cannot merge into the backbone's weights (it keeps its own "
                          f"modules or hooks): export it with --format peft where peft has it, else use peftbench.load")
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new folder")
    if model.meta.get("text_columns") and len(model.meta["text_columns"]) == 2:
        texts = [(t, t.lower()) for t in texts]  # a sentence-pair task is checked on pairs
    quiet_transformers()
    reference = outputs(model.model, model.tokenizer, texts, model.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        {"merged": _write_merged, "peft": _write_peft, ADAPTER_ONLY: _write_adapter}[fmt](model, tmp)

        def logits(loaded):
            got = outputs(loaded, model.tokenizer, texts, model.max_length)
            if model.kind == "generation" and got.shape[1] > reference.shape[1]:
                got = got[:, -reference.shape[1]:]  # peft's prompt learning returns the virtual tokens' logits too
            return got

        try:
            loaded = _load_back(tmp, fmt, model.kind)
            kernel_layers = bnb_cpu_kernel_layers(loaded)
            for layer in kernel_layers:  # first as peftbench runs 4-bit layers
                keep_one_format(layer)
            got = logits(loaded)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            library = "peft" if fmt == "peft" else "transformers"
            raise ConfigError(f"{library} cannot load or run the {fmt} export ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written to {out}") from None
        if got.shape != reference.shape:
            raise ConfigError(f"the {fmt} export returns logits of shape {tuple(got.shape)}, peftbench "
                              f"{tuple(reference.shape)}; nothing was written to {out}")
        diff = float((got - reference).abs().max())
        if not diff <= tolerance:
            why = ("; some 4-bit layers have rows of partial quantisation blocks, which bitsandbytes' CPU kernel "
                   "decodes wrongly (peftbench decodes them in torch)"
                   if any(getattr(m, "decodes_in_torch", False) for m in model.model.modules()) else "")
            raise ConfigError(f"the {fmt} export computes other logits than peftbench (max |diff| {diff:.3g} > "
                              f"{tolerance:g}){why}; nothing was written to {out}")
        meta = _meta(model, fmt, diff)
        if kernel_layers:  # then as a plain load runs them on this CPU: bitsandbytes' bfloat16 kernel
            for layer in kernel_layers:
                layer.support_avx512bf16_for_cpu = True
            meta["max_abs_logit_diff_bnb_cpu_kernel"] = float((logits(loaded) - reference).abs().max())
        if fmt != ADAPTER_ONLY:  # the adapter alone is an adapter folder (its config says what it is)
            (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fmt == "peft":
        _retarget(out)
    return meta
