"""One trial from a plain-data description: load, inject, verify, train, evaluate, measure.

``run_trial(payload)`` depends only on its payload (a JSON-able dict the runner builds), so
any executor (in-process, a Ray worker) can run it; it never touches the results store.
It returns the store's result fields, or raises (``Diverged`` carries the partial curves).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from peftbench.backbones.backbone import load_backbone
from peftbench.budget import verify
from peftbench.running.config import TaskEntry, TrainingConfig
from peftbench.running.costs import PeakMemory, environment, latency_ratio
from peftbench.errors import ConfigError
from peftbench.contract.injection import WEIGHTS_FILE
from peftbench.contract.registry import get_registry
from peftbench.tasks.task import REFERENCES, get_task

#: generation tasks (causal LM): the model reads PROMPT, learns " " + target + eos after it
PROMPT = "{source} ||"
LATENCY_REPEATS = 3

_TASKS: dict[str, object] = {}
_DATA: dict[tuple, object] = {}


def task_for(entry: TaskEntry):
    """The Task of an entry (cached per process: its data is read once)."""
    key = json.dumps(entry.model_dump(), sort_keys=True)
    if key not in _TASKS:
        options = {"text_columns": list(entry.text_columns) if entry.text_columns else None,
                   "label_column": entry.label_column, "kind": entry.kind}
        _TASKS[key] = get_task(entry.name, **options)
    return _TASKS[key]


def backbone_task_kind(task) -> str:
    return "causal_lm" if task.kind == "generation" else "classification"


# -- data ------------------------------------------------------------------------------------
def _encode_classification(task, tokenizer, max_length: int):
    def encode(batch):
        texts = [batch[c] for c in task.text_columns]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        out["labels"] = batch[task.label_column]
        return out

    return encode


def _encode_generation(task, tokenizer, max_length: int):
    eos = tokenizer.eos_token or ""

    def encode(batch):
        ids, masks, labels = [], [], []
        for source, target in zip(batch[task.source_column], batch[task.target_column]):
            prompt = tokenizer(PROMPT.format(source=source), add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + target + eos, add_special_tokens=False)["input_ids"]
            answer = answer[:max_length - min(len(prompt), max_length // 2)]  # too long: the target is cut first ...
            prompt = prompt[len(prompt) + len(answer) - max_length:] if len(prompt) + len(answer) > max_length else prompt
            ids.append(prompt + answer)  # ... then the source from its start, so every row keeps target tokens
            masks.append([1] * (len(prompt) + len(answer)))
            labels.append([-100] * len(prompt) + answer)  # loss on the target only
        return {"input_ids": ids, "attention_mask": masks, "labels": labels}

    return encode


def raw_data(task, entry: TaskEntry, cfg: TrainingConfig):
    """The task's splits with the suite's seeded limits (cached; loading also fixes the labels)."""
    key = (entry.model_dump_json(), cfg.train_limit, cfg.eval_limit, cfg.test_limit, cfg.data_seed)
    if key not in _DATA:
        raw = task.load(cfg.train_limit, cfg.eval_limit, cfg.data_seed)
        if cfg.test_limit != cfg.eval_limit:
            test = task.load(None, cfg.test_limit, cfg.data_seed)["test"]
            raw["test"] = test
        _DATA[key] = raw
    return _DATA[key]


def encoded_data(task, entry: TaskEntry, backbone, cfg: TrainingConfig):
    """Tokenized train (and validation/test for classification), cached per backbone and limits."""
    tok = backbone.tokenizer
    key = (entry.model_dump_json(), backbone.name, tok.padding_side, cfg.max_length, cfg.train_limit,
           cfg.eval_limit, cfg.test_limit, cfg.data_seed, cfg.batch_size)
    if key in _DATA:
        return _DATA[key]
    raw = raw_data(task, entry, cfg)
    if task.kind == "generation":
        fn = _encode_generation(task, tok, cfg.max_length)
        data = {
            "train": raw["train"].map(fn, batched=True, remove_columns=raw["train"].column_names),
            "validation": raw["validation"],  # decoded by generation
            "test": raw["test"],
            "latency": raw["test"].select(range(min(cfg.batch_size, len(raw["test"]))))
            .map(fn, batched=True, remove_columns=raw["test"].column_names),
        }
    else:
        fn = _encode_classification(task, tok, cfg.max_length)
        data = {split: raw[split].map(fn, batched=True, remove_columns=raw[split].column_names) for split in raw}
        data["latency"] = data["test"].select(range(min(cfg.batch_size, len(data["test"]))))
        for split in ("validation", "test"):  # order-free metrics: sorted by length, batches pad far less
            if split in data:
                data[split] = _by_length(data[split])
    _DATA[key] = data
    return data


def _by_length(ds):
    """``ds`` sorted by token count (stable): evaluation batches then hold similar lengths."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    return ds.select(sorted(range(len(ds)), key=lengths.__getitem__))


def _generation_eval(task, backbone, cfg: TrainingConfig, device):
    from peftbench.tasks.metrics import compute_metrics
    from peftbench.running.train import generate

    def evaluate(raw) -> dict:
        prompts = [PROMPT.format(source=s) for s in raw[task.source_column]]
        preds = generate(backbone.model, backbone.tokenizer, prompts, batch_size=cfg.eval_batch_size,
                         max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length, device=device)
        return compute_metrics(task, preds, raw[REFERENCES])

    return evaluate


# -- the trial -------------------------------------------------------------------------------
def load_trial_backbone(name: str, task, seed: int, device: torch.device, registry=None):
    """A fresh backbone with the task's head, seeded; decoders pad on the left for classification."""
    from transformers import set_seed

    set_seed(seed)
    backbone = load_backbone(name, task=backbone_task_kind(task), num_labels=max(task.num_labels, 1),
                             registry=registry)
    if task.kind == "generation" and not backbone.spec.is_decoder:
        raise ConfigError(f"task {task.name!r} is a generation task and needs a decoder backbone; "
                          f"{name!r} is an encoder ({backbone.spec.model_type})")
    if backbone.tokenizer is None:
        raise ConfigError(f"backbone {name!r} has no tokenizer")
    backbone.tokenizer.padding_side = "left" if backbone.spec.is_decoder and task.kind == "classification" else "right"
    backbone.model.to(device)
    return backbone


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _save(injection, backbone, directory: Path | None) -> int:
    """Save the adapter (+ head); return the adapter's stored bytes (file size minus the head's tensors)."""
    with tempfile.TemporaryDirectory(prefix="peftbench-adapter-") as tmp:
        target = directory if directory is not None else Path(tmp)
        injection.save(target)
        size = (target / WEIGHTS_FILE).stat().st_size
    return size - _bytes(backbone.head_parameters().values())


def _quantized_bytes(injection) -> int | None:
    value = getattr(injection, "quantized_bytes", None)
    value = value() if callable(value) else value
    return int(value) if value is not None else None


def run_trial(payload: dict) -> dict:
    """Train and evaluate one trial; return the store's result fields."""
    from peftbench.tasks.metrics import compute_metrics
    from peftbench.running.device import resolve_device, resolve_precision
    from peftbench.running.train import Diverged, curves, train

    cfg = TrainingConfig(**payload["training"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    registry = get_registry()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    entry = TaskEntry(**payload["task"])
    task = task_for(entry)
    method = registry.method(payload["method"])
    method_cfg = method.config(payload["method_config"])
    seed = int(payload["seed"])
    artifacts = Path(payload["artifacts"]) if payload.get("artifacts") else None

    raw_data(task, entry, cfg)  # before the backbone: the head's size comes from the labels
    backbone = load_trial_backbone(payload["backbone"], task, seed, device, registry)
    data = encoded_data(task, entry, backbone, cfg)
    backbone.freeze()
    injection = method.inject(backbone, method_cfg)
    backbone.model.to(device)
    trainable = verify(method, method_cfg, backbone, injection)

    generation_eval = _generation_eval(task, backbone, cfg, device) if task.kind == "generation" else None

    def metric_fn(eval_pred) -> dict:
        return compute_metrics(task, eval_pred.predictions, eval_pred.label_ids)

    peak = PeakMemory(device).start()
    desc = f"{method.name} {payload.get('budget') or ''} seed {seed}".replace("  ", " ")
    try:
        outcome, trainer, _ = train(backbone, data, task, cfg, lr=float(payload["lr"]), seed=seed, device=device,
                                    precision=precision, metric_fn=metric_fn, generation_eval=generation_eval,
                                    desc=desc, quiet=bool(payload.get("quiet")))
    except Diverged as exc:
        exc.result = {"trainable_params": trainable, "steps": exc.steps,
                      "curves": curves(exc.log_history, task.primary_metric),
                      "environment": {**environment(device), **_ranks()}}
        raise
    if generation_eval is not None:
        test_metrics = generation_eval(data["test"])
    else:
        out = trainer.predict(data["test"], metric_key_prefix="test")
        test_metrics = compute_metrics(task, out.predictions, out.label_ids)
    injection.finalize()
    stored_bytes = _save(injection, backbone, artifacts / "adapter" if artifacts and cfg.save_weights else None)
    peak_bytes, mem_kind = peak.stop()

    overhead = _inference_overhead(payload["backbone"], task, backbone, injection, data["latency"], seed, device, registry)
    trial_curves = curves(outcome.log_history, task.primary_metric)
    if artifacts is not None:
        _write_logs(artifacts, outcome.log_history, trial_curves)
    return {
        "primary_metric": task.primary_metric,
        "direction": task.direction,
        "metrics": test_metrics,
        "val_metrics": outcome.val_metrics,
        "trainable_params": trainable,
        "head_params": backbone.spec.head_params,
        "base_params": backbone.spec.base_params,
        "stored_params": method.stored_count(method_cfg, backbone.spec),
        "stored_bytes": stored_bytes,
        "quantized_bytes": _quantized_bytes(injection),
        "step_time_s": outcome.step_time_s,
        "peak_mem_bytes": peak_bytes,
        "mem_kind": mem_kind,
        "inference_overhead": overhead,
        "train_time_s": outcome.train_time_s,
        "steps": outcome.steps,
        "curves": trial_curves,
        "environment": {**environment(device), "precision": precision, **_ranks()},
        "artifacts": str(artifacts) if artifacts is not None else None,
    }


def _ranks() -> dict:
    """``{"world_size": N}`` for a trial trained by N ranks (torchrun/accelerate launch), else nothing."""
    from peftbench.running.executors import rank_and_world

    world = rank_and_world()[1]
    return {"world_size": world} if world > 1 else {}


def _inference_overhead(name, task, backbone, injection, latency_data, seed, device, registry) -> float:
    """Forward time with the method (merged where it can be) over the plain backbone's."""
    from peftbench.running.train import collator

    plain = load_trial_backbone(name, task, seed, device, registry)
    batch = collator(backbone.tokenizer, task.kind, plain.model)([latency_data[i] for i in range(len(latency_data))])
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    injection.merge()
    try:
        ratio, _, _ = latency_ratio(backbone.model, plain.model, batch, device, LATENCY_REPEATS)
    finally:
        injection.unmerge()
        del plain
    return ratio


def _write_logs(directory: Path, log_history: list[dict], trial_curves: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "log.jsonl", "w") as f:
        for entry in log_history:
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    (directory / "curves.json").write_text(json.dumps(trial_curves, indent=1) + "\n")


__all__ = ["run_trial", "task_for", "raw_data", "load_trial_backbone", "backbone_task_kind"]
