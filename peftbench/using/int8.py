"""INT8 adapters: post-training int8 quantisation of a trained method's weights, measured.

A finished trial's saved adapter is loaded (``peftbench.load``), and every ``nn.Linear`` whose
parameters are all the method's trained ones (LoRA's A and B, a bottleneck's down and up
projections; for full fine-tuning every block linear; the task head is never included) is
replaced by PyTorch's dynamically quantised linear (``torch.ao.quantization.quantize_dynamic``,
qint8 weights with a per-tensor scale, activations quantised on the fly). Other trained tensors
(LayerNorms, prefixes) stay fp32. Three figures come back, each fp32 against int8 on the trial's
own validation subsample:

- stored bytes of the method's weights (int8 weight bytes + fp32 biases + scale and zero point,
  plus the method's tensors left fp32) against their fp32 bytes;
- the primary metric's change (int8 minus fp32);
- forward time over the validation split, int8 over fp32 (the fastest of ``REPEATS`` passes each;
  the fp32 passes run before quantising, since hooks tie a copy of the model to the same adapter
  modules).

The figures are cached beside the adapter (``int8.json``), so a report computes each trial once.
Classification trials only: a generation trial's figures would need decoding (not measured).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

INT8_FILE = "int8.json"
REPEATS = 2
#: what the figures mean (the cache is recomputed when this changes)
INT8_VERSION = 1


def method_linears(backbone) -> list[str]:
    """Module names (in ``backbone.model``) of the plain ``nn.Linear`` layers made only of the method's trained
    parameters (trainable, task head excluded)."""
    trained = {id(p) for p in backbone.trainable_parameters().values()}
    names = []
    for name, module in backbone.model.named_modules():
        own = list(module.parameters(recurse=False))
        if type(module) is nn.Linear and own and all(id(p) in trained for p in own):
            names.append(name)
    return names


def _qbytes(module) -> int:
    """Stored bytes of a dynamically quantised linear: int8 weight, fp32 bias, scale and zero point."""
    weight = module.weight()
    bias = module.bias()
    scheme = 16 if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric) else \
        16 * weight.q_per_channel_scales().numel()
    return weight.int_repr().numel() + (bias.numel() * bias.element_size() if bias is not None else 0) + scheme


def quantize_method(backbone) -> tuple[int, int, list[str]]:
    """Quantise the method's linears in place; return (fp32 bytes, int8 bytes of the method's weights, names)."""
    from torch.ao.quantization import quantize_dynamic

    trained = backbone.trainable_parameters()
    fp32 = sum(p.numel() * p.element_size() for p in trained.values())
    names = method_linears(backbone)
    if not names:
        return fp32, fp32, []
    modules = dict(backbone.model.named_modules())
    quantized_ids = {id(p) for n in names for p in modules[n].parameters(recurse=False)}
    rest = sum(p.numel() * p.element_size() for p in trained.values() if id(p) not in quantized_ids)
    with warnings.catch_warnings():  # torch deprecates torch.ao.quantization in favour of torchao, not installed
        warnings.simplefilter("ignore")
        quantize_dynamic(backbone.model, set(names), dtype=torch.qint8, inplace=True)
    modules = dict(backbone.model.named_modules())
    return fp32, rest + sum(_qbytes(modules[n]) for n in names), names


@torch.inference_mode()
def _predict(model, batches) -> tuple[list[int], float]:
    """Predicted label ids over ``batches`` and the seconds the forwards took."""
    preds, start = [], time.perf_counter()
    for batch in batches:
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds, time.perf_counter() - start


def measure_int8(trial_folder: Path, spec, registry) -> dict:
    """The INT8 figures of one trial (module docstring), from its saved adapter in ``trial_folder``."""
    from peftbench.running.train import collator
    from peftbench.tasks.data import encoded_data, raw_data, task_for
    from peftbench.tasks.metrics import compute_metrics
    from peftbench.using.load import load

    task = task_for(spec.task, registry)
    if task.kind != "classification":
        return {"version": INT8_VERSION, "skipped": f"{task.kind} task: only classification is measured"}
    model = load(trial_folder, registry=registry)
    backbone, cfg = model.backbone, spec.training
    raw_data(task, spec.task, cfg)
    validation = encoded_data(task, spec.task, backbone, cfg)["validation"]
    labels = [int(x) for x in validation["labels"]]
    collate = collator(backbone.tokenizer, task.kind, backbone.model)
    rows = [validation[i] for i in range(len(validation))]
    size = cfg.eval_batch_size
    batches = [{k: v for k, v in collate(rows[i:i + size]).items() if k != "labels"} for i in range(0, len(rows), size)]
    backbone.model.eval()
    fp32_runs = [_predict(backbone.model, batches) for _ in range(REPEATS)]
    fp32, int8, names = quantize_method(backbone)
    int8_runs = [_predict(backbone.model, batches) for _ in range(REPEATS)]
    fp32_preds, int8_preds = fp32_runs[0][0], int8_runs[0][0]
    fp32_times, int8_times = [t for _, t in fp32_runs], [t for _, t in int8_runs]
    primary = spec.primary_metric
    before = compute_metrics(task, fp32_preds, labels)[primary]
    after = compute_metrics(task, int8_preds, labels)[primary]
    return {"version": INT8_VERSION, "quantized_linears": len(names), "fp32_bytes": fp32, "int8_bytes": int8,
            "metric": primary, "split": "validation", "examples": len(labels), "fp32_metric": before,
            "int8_metric": after, "delta": after - before, "fp32_s": min(fp32_times), "int8_s": min(int8_times),
            "time_ratio": min(int8_times) / min(fp32_times)}


def int8_figures(trial_folder: Path, spec, registry) -> dict:
    """``measure_int8`` cached in the trial folder's ``int8.json`` (recomputed when ``INT8_VERSION`` changes)."""
    cache = Path(trial_folder) / INT8_FILE
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("version") == INT8_VERSION:
            return data
    data = measure_int8(Path(trial_folder), spec, registry)
    cache.write_text(json.dumps(data, indent=1) + "\n")
    return data
