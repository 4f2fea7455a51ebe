"""One trial's training and evaluation with transformers' ``Trainer``.

The Trainer (and through it accelerate) runs the loop, so a trial runs unchanged under
``accelerate launch`` or ``torchrun``. We add: a NaN/inf check on every step (a diverged
trial stops at once), step timing, a progress bar, early stopping on the validation
primary metric with the best trainable state kept in memory (no checkpoint folders), and,
for generation tasks, validation by greedy decoding.
"""

from __future__ import annotations

import inspect
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from peftbench.results.records import CurvePoint, TrainingSpec
from peftbench.errors import ConfigError

#: validation passes per trial when ``eval_every`` is null
EVALS_PER_TRIAL = 4
#: logged points of the loss curve per trial
LOG_POINTS = 50


class Diverged(RuntimeError):
    """The training loss became NaN or infinite (``log_history``/``steps`` say how far it got)."""

    log_history: list[dict] = []
    steps: int = 0
    result = None  # the TrialResult of what the trial got before it diverged


@dataclass
class TrainOutcome:
    val_metrics: dict
    best_step: int | None
    steps: int
    step_times: list[float]
    train_time_s: float
    log_history: list[dict] = field(default_factory=list)
    planned_steps: int | None = None  # what the schedule allowed
    stopped_early: bool = False  # patience ended training before that
    last_eval_step: int | None = None
    pruned: bool = False  # the search's pruner stopped it at a validation pass

    @property
    def step_time_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


def higher_is_better(direction: str) -> bool:
    if direction in ("max", "maximize", "higher", "up"):
        return True
    if direction in ("min", "minimize", "lower", "down"):
        return False
    raise ConfigError(f"metric direction {direction!r} is not one of max, min")


class _PositionsFromMask:
    """Left-padded batches get ``position_ids`` counted from the first real token.

    Models with absolute positions (GPT-2) would otherwise shift every real token by the
    amount of padding, so a row's prediction would depend on its batch-mates.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return batch


def collator(tokenizer, kind: str, model=None):
    """Dynamic padding; for left padding (decoder classification) also the real positions."""
    if kind == "generation":  # pads labels with -100 so padding is not learned
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    pad = DataCollatorWithPadding(tokenizer)
    takes_positions = model is not None and "position_ids" in inspect.signature(model.forward).parameters
    return _PositionsFromMask(pad) if tokenizer.padding_side == "left" and takes_positions else pad


def plan_steps(train_size: int, cfg: TrainingSpec) -> int:
    """Optimizer steps the trial will take (before early stopping): ``max_steps`` exactly, else the
    epochs' steps, at most ``step_cap``."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(train_size / (cfg.batch_size * cfg.grad_accum)))
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return min(steps, cfg.step_cap) if cfg.step_cap else steps


class _Trainer(Trainer):
    """Trainer that stops a diverging run, and validates generation tasks by decoding."""

    def __init__(self, *args, generation_eval: Callable[[object], dict] | None = None, **kwargs):
        self._generation_eval = generation_eval
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = bool(torch.isfinite(loss).all())
        if self.args.world_size > 1:  # DDP: every rank stops at the same step, or none does (no rank left waiting)
            flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if not flag.item() and finite:
                raise Diverged(f"training loss became non-finite on another rank at step {self.state.global_step + 1}")
        if not finite:
            raise Diverged(f"training loss became {loss.item()} at step {self.state.global_step + 1}")
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self._generation_eval is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        result = self._generation_eval(data)
        if self.args.world_size > 1:  # DDP: every rank decodes alike; rank 0's numbers decide early stopping everywhere
            box = [result]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


class _Watch(TrainerCallback):
    """Early stopping on the validation metric, best trainable state, step times, progress bar; and
    for a search trial, ``prune(step, value) -> bool`` asked at each validation pass."""

    def __init__(self, model, primary: str, higher: bool, patience: int | None, bar_desc: str, quiet: bool, device,
                 prune: Callable[[int, float], bool] | None = None, after_step: Callable[[int, int], None] | None = None):
        self.model, self.key, self.higher, self.patience = model, f"eval_{primary}", higher, patience
        self.prune, self.after_step = prune, after_step
        self.pruned = False
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad = 0
        self.stopped_early = False
        self.last_eval_step: int | None = None
        self.step_times: list[float] = []
        self._t0 = 0.0
        self._cuda = device.type == "cuda"
        self._desc, self._quiet, self._bar = bar_desc, quiet, None

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=state.max_steps, desc=self._desc, leave=False, position=1, disable=self._quiet, dynamic_ncols=True)

    def on_optimizer_step(self, args, state, control, **kwargs):  # gradients still there; global_step: this step's index
        if self.after_step is not None:
            self.after_step(state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.step_times.append(time.perf_counter() - self._t0)
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", self.key) and isinstance(v, (int, float))}
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self.last_eval_step = state.global_step
        better = self.best is None or (value > self.best if self.higher else value < self.best)
        if better:
            self.best, self.best_step, self.bad = value, state.global_step, 0
            self.best_metrics = {k[len("eval_"):]: v for k, v in metrics.items()
                                 if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
            self.best_state = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            self.bad += 1
            if self.patience and self.bad >= self.patience:
                control.should_training_stop = True
                self.stopped_early = state.global_step < state.max_steps
        if self.prune is not None and not control.should_training_stop and state.global_step < state.max_steps \
                and self.prune(state.global_step, value):
            control.should_training_stop = True
            self.pruned = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def restore_best(self) -> None:
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.best_state:
                    p.copy_(self.best_state[name].to(p.device))


def per_rank_batch(batch_size: int) -> int:
    """Under torchrun/accelerate launch the suite's batch is split over the ranks, so a trial sees the
    same batches (and takes the same steps) on one process or several."""
    from peftbench.running.distributed import rank_and_world

    world = rank_and_world()[1]
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over {world} ranks; "
                          f"use a multiple of {world} (e.g. --batch-size {batch_size + world - batch_size % world})")
    return batch_size // world


def training_arguments(cfg: TrainingSpec, lr: float, seed: int, total_steps: int, device: torch.device,
                       precision: str, output_dir: str, report_to: list[str] | str = "none",
                       run_name: str | None = None) -> TrainingArguments:
    """``report_to``/``run_name``: the trial's trackers and run (``running.trackers``), never its numbers."""
    eval_every = cfg.eval_every or max(1, math.ceil(total_steps / EVALS_PER_TRIAL))
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_rank_batch(cfg.batch_size),
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or (total_steps if cfg.step_cap else -1),
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=int(cfg.warmup_ratio * total_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=max(1, total_steps // LOG_POINTS),
        logging_nan_inf_filter=False,
        report_to=report_to,
        run_name=run_name,
        seed=seed,
        data_seed=seed,
        use_cpu=device.type == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        disable_tqdm=True,
        dataloader_num_workers=0,
        label_names=["labels"],
        # non-reentrant checkpointing: gradients reach the method's parameters although the frozen embeddings'
        # output does not require grad (no enable_input_require_grads needed), hooks and key/value prefixes included
        **_checkpointing(cfg),
    )


def _checkpointing(cfg: TrainingSpec) -> dict:
    """TrainingArguments' checkpointing fields, by their name in this transformers (activation_* since 5.x;
    the gradient_* names warn there)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    on = bool(cfg.gradient_checkpointing)
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def train(backbone, data, task, cfg: TrainingSpec, *, lr: float, seed: int, device: torch.device, precision: str,
          metric_fn: Callable[[object], dict], generation_eval: Callable[[object], dict] | None = None,
          desc: str = "trial", quiet: bool = False,
          prune: Callable[[int, float], bool] | None = None, report_to: list[str] | str = "none",
          run_name: str | None = None, after_step: Callable[[int, int], None] | None = None,
          ) -> tuple[TrainOutcome, _Trainer, _Watch]:
    """Train ``backbone.model`` (already frozen + injected) and restore its best validation state.

    ``data`` holds tokenized ``train`` and ``validation`` (raw validation for generation tasks);
    ``prune(step, value)``: a search trial's pruner, asked at each validation pass (True stops it);
    ``report_to``, ``run_name``: the trackers the Trainer logs to and the run's name; ``after_step(step,
    total)``: called after each optimizer step (``Injection.after_optimizer_step``).
    """
    model = backbone.model
    total = plan_steps(len(data["train"]), cfg)
    watch = _Watch(model, task.primary_metric, higher_is_better(task.direction), cfg.patience, desc, quiet, device,
                   prune, after_step)
    kind = "generation" if generation_eval is not None else "classification"
    with tempfile.TemporaryDirectory(prefix="peftbench-trainer-") as tmp:
        args = training_arguments(cfg, lr, seed, total, device, precision, tmp, report_to, run_name)
        trainer = _Trainer(
            model=model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["validation"],
            data_collator=collator(backbone.tokenizer, kind, model),
            compute_metrics=metric_fn if generation_eval is None else None,
            preprocess_logits_for_metrics=_argmax if generation_eval is None else None,
            callbacks=[watch],
            generation_eval=generation_eval,
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        try:
            trainer.train()
        except Diverged as exc:  # keep what was logged up to the bad step
            exc.log_history = list(trainer.state.log_history)
            exc.steps = trainer.state.global_step
            raise
        finally:
            watch.on_train_end(args, trainer.state, trainer.control)
        train_time = time.perf_counter() - t0
    watch.restore_best()
    model.eval()
    outcome = TrainOutcome(
        val_metrics=watch.best_metrics,
        best_step=watch.best_step,
        steps=trainer.state.global_step,
        step_times=watch.step_times,
        train_time_s=train_time,
        log_history=list(trainer.state.log_history),
        planned_steps=trainer.state.max_steps,
        stopped_early=watch.stopped_early,
        last_eval_step=watch.last_eval_step,
        pruned=watch.pruned,
    )
    return outcome, trainer, watch


def predict(backbone, dataset, task, cfg: TrainingSpec, device: torch.device, precision: str):
    """(predicted label ids, label ids) of a classifier on ``dataset``, batched as a trained trial's
    test pass is (the same collator, eval batch size and precision)."""
    with tempfile.TemporaryDirectory(prefix="peftbench-predict-") as tmp:
        trainer = _Trainer(model=backbone.model, args=training_arguments(cfg, 1e-3, 0, 1, device, precision, tmp),
                           eval_dataset=dataset, data_collator=collator(backbone.tokenizer, "classification", backbone.model),
                           preprocess_logits_for_metrics=_argmax)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        out = trainer.predict(dataset, metric_key_prefix="test")
    return out.predictions, out.label_ids


def _argmax(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def curves(log_history: list[dict], primary: str) -> list[CurvePoint]:
    """[{step, loss, val_metric}] from the Trainer's log (None where a point has no value)."""
    points: dict[int, dict] = {}
    key = f"eval_{primary}"
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        point = points.setdefault(step, {"step": step, "loss": None, "val_metric": None})
        if "loss" in entry:
            point["loss"] = entry["loss"]
        if key in entry:
            point["val_metric"] = entry[key]
    return [CurvePoint(**points[s]) for s in sorted(points)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, max_length: int,
             device: torch.device) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches)."""
    side, cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # the prompt's end is where decoding starts
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out.extend(t.strip() for t in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
        model.train(was_training)
    return out
