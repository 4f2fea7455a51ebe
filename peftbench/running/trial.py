"""One trial from its spec: load, apply the method, train, evaluate, measure.

``run_trial(spec, options, artifacts, registry, pruning)`` depends only on its arguments, so
any executor (in-process, a Ray worker, every rank under torchrun) can run it; it never touches
the results store. It returns a ``TrialResult`` or raises (``Diverged`` carries what the trial
got so far). A search trial is selected on validation: it never evaluates on test; with
``pruning`` (its group's study, ``running.search.Pruning``) Optuna's pruner may stop it at a
validation pass, and it ends done with ``pruned=True`` and its best validation so far.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from peftbench.backbones.backbone import load_backbone
from peftbench.contract.apply import apply
from peftbench.contract.injection import WEIGHTS_FILE
from peftbench.errors import ConfigError, VerificationError
from peftbench.results.records import TrialResult, TrialSpec
from peftbench.running.allocation import allocate
from peftbench.running.costs import PeakMemory, environment, latency_ratio, machine_load
from peftbench.running.distributed import rank_and_world
from peftbench.running.options import RunOptions
from peftbench.running.search import Pruning, pruning_callback
from peftbench.running.trackers import TrialTracking
from peftbench.tasks.data import PROMPT, backbone_task_kind, encoded_data, raw_data, task_for
from peftbench.tasks.task import REFERENCES

LATENCY_REPEATS = 3


def load_trial_backbone(name: str, task, seed: int, device: torch.device, registry):
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


def _generation_eval(task, backbone, spec: TrialSpec, device):
    from peftbench.running.train import generate
    from peftbench.tasks.metrics import compute_metrics

    cfg = spec.training

    def evaluate(raw) -> dict:
        prompts = [PROMPT.format(source=s) for s in raw[task.source_column]]
        preds = generate(backbone.model, backbone.tokenizer, prompts, batch_size=cfg.eval_batch_size,
                         max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length, device=device)
        return compute_metrics(task, preds, raw[REFERENCES])

    return evaluate


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _save(injection, backbone, directory: Path | None, metadata: dict | None = None) -> int:
    """Save the adapter (+ head, + ``metadata``); return the adapter's stored bytes (file size minus the head's tensors)."""
    with tempfile.TemporaryDirectory(prefix="peftbench-adapter-") as tmp:
        target = directory if directory is not None else Path(tmp)
        injection.save(target, metadata=metadata)
        size = (target / WEIGHTS_FILE).stat().st_size
    return size - _bytes(backbone.head_parameters().values())


def _ranks() -> dict:
    """``{"world_size": N}`` for a trial trained by N ranks (torchrun/accelerate launch), else nothing."""
    world = rank_and_world()[1]
    return {"world_size": world} if world > 1 else {}


def run_trial(spec: TrialSpec, options: RunOptions, artifacts: str | None, registry,
              pruning: Pruning | None = None) -> TrialResult:
    """Train and evaluate one trial; return what it measured (``pruning``: search trials only)."""
    from peftbench.running.device import resolve_device, resolve_precision
    from peftbench.running.train import Diverged, curves, train
    from peftbench.tasks.metrics import compute_metrics

    load_start = machine_load()
    cfg = spec.training
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    precision = resolve_precision(cfg.precision, device)
    task = task_for(spec.task, registry)
    method = registry.method(spec.method)
    folder = Path(artifacts) if artifacts else None

    raw_data(task, spec.task, cfg)  # before the backbone: the head's size comes from the labels
    backbone = load_trial_backbone(spec.backbone, task, spec.seed, device, registry)
    data = encoded_data(task, spec.task, backbone, cfg)
    saved = folder is not None and options.save_weights
    metadata = adapter_metadata(task, backbone, cfg) if saved else None  # before apply: the base's own weights
    base_sha256 = None
    if spec.init_from and spec.init_from.get("backbone_sha256"):  # also before apply
        from peftbench.backbones.fingerprint import fingerprint

        base_sha256 = metadata["backbone_sha256"] if metadata else fingerprint(backbone)
    spec = allocate(method, backbone, spec, data, task, device, folder)  # allocation: importance sets layer_sizes
    injection = applied(method, backbone, spec)
    backbone.model.to(device)
    if spec.init_from:  # two-stage training: the checked injection starts from the source's weights
        from peftbench.running.init_from import start_from

        start_from(injection, backbone, spec, base_sha256)

    generation_eval = _generation_eval(task, backbone, spec, device) if task.kind == "generation" else None

    def metric_fn(eval_pred) -> dict:
        return compute_metrics(task, eval_pred.predictions, eval_pred.label_ids)

    peak = PeakMemory(device).start()
    with TrialTracking(spec, options, folder) as tracking:  # the trial's runs (--report-to); FAILED if it raises
        desc = f"{spec.method} {spec.budget or ''} seed {spec.seed}".replace("  ", " ")
        try:
            outcome, trainer, _ = train(backbone, data, task, cfg, lr=spec.lr, seed=spec.seed, device=device,
                                        precision=precision, metric_fn=metric_fn, generation_eval=generation_eval,
                                        desc=desc, quiet=options.quiet,
                                        prune=pruning_callback(pruning) if spec.role == "search" else None,
                                        report_to=tracking.report_to, run_name=tracking.run_name,
                                        after_step=injection.after_optimizer_step)
        except Diverged as exc:
            exc.result = TrialResult(steps=exc.steps, curves=curves(exc.log_history, task.primary_metric),
                                     environment={**environment(device), **_ranks()}, examples=_examples(data, spec),
                                     load_start=load_start, load_end=machine_load())
            raise
        test_metrics, chance = {}, {}
        if spec.role == "final":  # selection never sees test: a search trial stops at validation
            if generation_eval is not None:
                test_metrics = generation_eval(data["test"])
            else:
                out = trainer.predict(data["test"], metric_key_prefix="test")
                test_metrics = compute_metrics(task, out.predictions, out.label_ids)
                chance = majority_scores(task, data["train"]["labels"], out.label_ids)
            tracking.log_test(test_metrics, outcome.best_step or outcome.steps)
        injection.finalize()
        stored_bytes = _save(injection, backbone, folder / "adapter" if saved else None, metadata)
        peak_bytes, mem_kind = peak.stop()

        overhead = _inference_overhead(spec.backbone, task, backbone, injection, data["latency"], spec.seed, device,
                                       registry)
        trial_curves = curves(outcome.log_history, task.primary_metric)
        if folder is not None:
            _write_logs(folder, outcome.log_history, trial_curves)
    return TrialResult(
        metrics=test_metrics, val_metrics=outcome.val_metrics, best_step=outcome.best_step,
        stored_bytes=stored_bytes, costs=injection.costs(), step_time_s=outcome.step_time_s,
        peak_mem_bytes=peak_bytes, mem_kind=mem_kind, mem_start_bytes=peak.start_bytes, inference_overhead=overhead,
        train_time_s=outcome.train_time_s, steps=outcome.steps, curves=trial_curves,
        environment={**environment(device), "precision": precision, **_ranks()},
        artifacts=str(folder) if folder is not None else None,
        stopped_early=outcome.stopped_early, planned_steps=outcome.planned_steps,
        last_eval_step=outcome.last_eval_step, chance=chance, pruned=outcome.pruned,
        splits={"validation": f"selects checkpoints{' and search values' if spec.role == 'search' else ''}: "
                              f"{task.origins.get('validation', '')}",
                **({"test": f"read once, by this final trial: {task.origins.get('test', '')}"}
                   if spec.role == "final" else {})},
        examples=_examples(data, spec), load_start=load_start, load_end=machine_load(),
    )


def _examples(data: dict, spec: TrialSpec) -> dict[str, int]:
    """Examples per split the trial used: train and validation, and test for a final trial (it reads it)."""
    splits = ("train", "validation", "test") if spec.role == "final" else ("train", "validation")
    return {split: len(data[split]) for split in splits if split in data}


def applied(method, backbone, spec: TrialSpec):
    """``method`` applied to ``backbone`` at the trial's config, its size checked against the plan's."""
    injection = apply(method, backbone, spec.method_config)
    if injection.trainable_params != spec.trainable_params:
        raise VerificationError(f"method {spec.method!r}: the plan says {spec.trainable_params:,} trainable "
                                f"parameters, the injection made {injection.trainable_params:,}")
    return injection


def adapter_metadata(task, backbone, cfg) -> dict:
    """What a saved adapter records so that ``peftbench.load`` can rebuild and check it alone."""
    from peftbench.backbones.fingerprint import fingerprint

    return {"task": task.name, "task_kind": task.kind, "labels": list(task.labels), "num_labels": task.num_labels,
            "text_columns": list(task.text_columns), "max_length": cfg.max_length,
            "backbone_sha256": fingerprint(backbone)}


def majority_scores(task, train_labels, test_labels) -> dict[str, float]:
    """The test metrics of always predicting train's most frequent class (the chance floor)."""
    import numpy as np
    from peftbench.tasks.metrics import compute_metrics

    labels = np.asarray(test_labels)
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return compute_metrics(task, np.full_like(labels, majority), labels)


def _inference_overhead(name, task, backbone, injection, latency_data, seed, device, registry) -> float:
    """Forward time with the method (merged where it can be) over the plain backbone's."""
    from peftbench.running.train import collator

    plain = _plain_backbone(name, task, seed, device, registry)
    batch = collator(backbone.tokenizer, task.kind, plain.model)([latency_data[i] for i in range(len(latency_data))])
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    injection.merge()
    try:
        ratio, _, _ = latency_ratio(backbone.model, plain.model, batch, device, LATENCY_REPEATS)
    finally:
        injection.unmerge()
    return ratio


_PLAIN: dict[tuple, object] = {}


def _plain_backbone(name, task, seed, device, registry):
    """The untouched backbone the latency ratio compares against, loaded once per process and kind
    (only forward passes run on it, so one copy serves every trial; the last one is kept)."""
    key = (name, backbone_task_kind(task), max(task.num_labels, 1), str(device), id(registry))
    if key not in _PLAIN:
        _PLAIN.clear()
        _PLAIN[key] = load_trial_backbone(name, task, seed, device, registry)
    return _PLAIN[key]


def _write_logs(directory: Path, log_history: list[dict], trial_curves) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "log.jsonl", "w") as f:
        for entry in log_history:
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    (directory / "curves.json").write_text(json.dumps([c.model_dump() for c in trial_curves], indent=1) + "\n")


__all__ = ["run_trial", "load_trial_backbone"]
