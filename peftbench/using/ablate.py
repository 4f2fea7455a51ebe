"""``peftbench ablate``: switch a trained method off in every contiguous span of layers and measure the drop.

For each finished final trial of the chosen per-layer methods that saved its weights, the adapter is
loaded (``peftbench.load``'s path: the backbone checked against the recorded hash, the method applied
with its stored config, its weights and head loaded), the validation split the trial was selected on
is encoded and collated once, and the primary metric is measured with every layer on (the baseline)
and with each span ``[i..j]`` of layers off through the injection's per-layer switch
(``Injection.disable_layers``; see ``peftbench.contract.layers``): the plain backbone layer computes
there, the rest as trained (Houlsby et al., 2019, Fig. 6). Nothing is method-specific: a method that
added nothing to the layers (a soft prompt, the head alone, full fine-tuning) is skipped with a note.

Results go to ``ablation.json`` in the suite folder, written after every trial, keyed by trial id
and by the hash of the adapter weights and the validation subsample: a rerun reuses what is there
(and resumes an interrupted ablation), and ``peftbench report`` draws the heatmaps and the Ablation
section from the file without recomputing anything.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from peftbench.errors import ConfigError
from peftbench.results.ablation import ABLATION_FILE, read_ablation, span_key, spans, write_ablation


# -- one trial -----------------------------------------------------------------------------------
def _fingerprint(adapter: Path, spec) -> str:
    """What an entry's values depend on beyond the trial id: the saved weights and the validation subsample."""
    from peftbench.contract.injection import WEIGHTS_FILE

    h = hashlib.sha256(Path(adapter, WEIGHTS_FILE).read_bytes())
    t = spec.training
    h.update(json.dumps([t.eval_limit, t.data_seed, t.max_length, t.max_new_tokens]).encode())
    return h.hexdigest()


class Validation:
    """A trial's validation split, collated once into batches, and its metric for a model."""

    def __init__(self, spec, backbone, registry, device: torch.device, batch_size: int):
        from peftbench.running.train import collator
        from peftbench.tasks.data import encoded_data, raw_data, task_for

        self.task = task_for(spec.task, registry)
        raw_data(self.task, spec.task, spec.training)
        data = encoded_data(self.task, spec.task, backbone, spec.training)
        self.metric, self.device, self.cfg = spec.primary_metric, device, spec.training
        self.backbone = backbone
        validation = data["validation"]
        if self.task.kind == "generation":
            self.batches = None
            self.raw = validation
            return
        collate = collator(backbone.tokenizer, "classification", backbone.model)
        rows = [validation[i] for i in range(len(validation))]
        self.batches = []
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size])
            self.batches.append({k: v.to(device) for k, v in batch.items()})

    @torch.no_grad()
    def score(self) -> float:
        """The primary metric of the backbone (with whatever layers are on) on the validation split."""
        from peftbench.tasks.metrics import compute_metrics

        model = self.backbone.model
        model.eval()
        if self.batches is None:
            from peftbench.running.train import generate
            from peftbench.tasks.data import PROMPT
            from peftbench.tasks.task import REFERENCES

            prompts = [PROMPT.format(source=s) for s in self.raw[self.task.source_column]]
            preds = generate(model, self.backbone.tokenizer, prompts, batch_size=self.cfg.eval_batch_size,
                             max_new_tokens=self.cfg.max_new_tokens, max_length=self.cfg.max_length,
                             device=self.device)
            metrics = compute_metrics(self.task, preds, self.raw[REFERENCES])
        else:
            preds, labels = [], []
            for batch in self.batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                preds.append(model(**inputs).logits.argmax(-1).cpu())
                labels.append(batch["labels"].cpu())
            metrics = compute_metrics(self.task, torch.cat(preds).numpy(), torch.cat(labels).numpy())
        if self.metric not in metrics:
            raise ConfigError(f"task {self.task.name!r} reports {', '.join(metrics)}, not its primary metric "
                              f"{self.metric!r}")
        return float(metrics[self.metric])


def ablate_trial(suite_dir: Path, record, registry, device: torch.device, batch_size: int, tick) -> dict:
    """The entry of one trial: its baseline and every span's metric (``spans`` None when its method added
    nothing to the layers); ``tick(0, n)`` announces its n evaluations, ``tick()`` follows each."""
    from peftbench.using.load import load_trial
    from peftbench.using.locate import Located, trial_adapter

    adapter = trial_adapter(suite_dir, record)
    model = load_trial(Located(adapter, spec=record.spec, trial_id=record.trial_id), registry, device)
    injection, s = model.injection, record.spec
    entry = {"task": s.task.name, "backbone": s.backbone, "budget": s.budget, "method": s.method,
             "display": s.display, "seed": s.seed, "fingerprint": _fingerprint(adapter, s), "spans": None}
    if not injection.layers():
        return entry  # nothing per-layer: recorded as such, so a rerun does not load it again
    layers = model.backbone.spec.layers
    t0 = time.perf_counter()
    validation = Validation(s, model.backbone, registry, device, batch_size)
    tick(0, len(spans(layers)) + 1)  # this trial's evaluations join the progress bar's total
    baseline = validation.score()
    tick()
    values = {}
    for first, last in spans(layers):
        with injection.layers_disabled(range(first, last + 1)):
            values[span_key(first, last)] = validation.score()
        tick()
    return {**entry, "metric": s.primary_metric, "direction": s.direction, "layers": layers,
            "method_layers": injection.layers(), "examples": validation_size(validation), "baseline": baseline,
            "spans": values, "seconds": round(time.perf_counter() - t0, 2)}


def validation_size(validation: Validation) -> int:
    if validation.batches is None:
        return len(validation.raw)
    return sum(len(b["labels"]) for b in validation.batches)


# -- the suite -----------------------------------------------------------------------------------
def select_trials(suite_dir: Path, methods: list[str] | None, budget: str | None, task: str | None,
                  backbone: str | None, registry) -> list:
    """The finished final trials to ablate (a one-line error naming what the suite has when none match)."""
    from peftbench.using.locate import _records, _same_budget

    finals = [r for r in _records(suite_dir) if r.spec.role == "final" and r.done]
    if not finals:
        raise ConfigError(f"{suite_dir} has no finished trials to ablate")
    chosen = finals
    if methods:
        wanted = {registry.canonical(m) for m in methods}
        have = {r.spec.method for r in finals}
        missing = sorted(wanted - have)
        if missing:
            raise ConfigError(f"--method {', '.join(missing)}: no finished trial in {suite_dir}; it has: "
                              f"{', '.join(sorted(have))}")
        chosen = [r for r in chosen if r.spec.method in wanted]
    for value, what, key in ((task, "task", lambda s: s.task.name), (backbone, "backbone", lambda s: s.backbone)):
        if value is not None:
            kept = [r for r in chosen if key(r.spec) == value]
            if not kept:
                raise ConfigError(f"--{what} {value!r}: no finished trial has it; the suite has: "
                                  f"{', '.join(sorted({str(key(r.spec)) for r in chosen}))}")
            chosen = kept
    if budget is not None:
        kept = [r for r in chosen if _same_budget(r.spec.budget, budget)]
        if not kept:
            raise ConfigError(f"--budget {budget!r}: no finished trial has it; the suite has: "
                              f"{', '.join(sorted({str(r.spec.budget) for r in chosen}))}")
        chosen = kept
    return sorted(chosen, key=lambda r: (r.spec.task.name, r.spec.backbone, r.spec.budget or "", r.spec.method,
                                         r.spec.variant, r.spec.seed))


def ablate(suite_dir: str | Path, methods: list[str] | None = None, budget: str | None = None, task: str | None = None,
           backbone: str | None = None, device: str = "cpu", batch_size: int = 64, registry=None,
           quiet: bool = False, log=print) -> dict:
    """Ablate the chosen trials of a suite folder (cached entries reused); returns ``ablation.json``'s content."""
    from peftbench.contract.registry import get_registry
    from peftbench.running.device import resolve_device
    from peftbench.using.locate import trial_adapter

    suite_dir = Path(suite_dir)
    registry = registry if registry is not None else get_registry()
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give a positive number of examples per forward pass")
    records = select_trials(suite_dir, methods, budget, task, backbone, registry)
    data = read_ablation(suite_dir)
    todo, skipped = [], []
    for record in records:
        entry = data["trials"].get(record.trial_id) or data["not_per_layer"].get(record.trial_id)
        try:
            adapter = trial_adapter(suite_dir, record)
        except ConfigError as exc:
            skipped.append(str(exc))
            continue
        if entry is None or entry.get("fingerprint") != _fingerprint(adapter, record.spec):
            todo.append(record)
        elif record.trial_id in data["not_per_layer"]:
            skipped.append(_not_per_layer(record))
    if not todo:
        for reason in skipped:
            log(f"skipped: {reason}")
        log(f"{len(records) - len(skipped)} trial(s) already ablated in {suite_dir / ABLATION_FILE}: nothing to compute")
        return data
    device = resolve_device(device)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="eval", desc="ablation", file=sys.stderr, dynamic_ncols=True)

    def tick(evaluated: int = 1, more: int = 0) -> None:
        if bar is None:
            return
        bar.total += more
        if evaluated:
            bar.update(evaluated)
        else:
            bar.refresh()

    t0, done = time.perf_counter(), 0
    try:
        for n, record in enumerate(todo, 1):
            s = record.spec
            if bar is not None:
                bar.set_postfix_str(f"trial {n}/{len(todo)}: {s.display} {s.budget or ''} seed {s.seed}")
            entry = ablate_trial(suite_dir, record, registry, device, batch_size, tick)
            data = read_ablation(suite_dir)  # what another ablate of this suite wrote meanwhile is kept
            if entry["spans"] is None:
                data["not_per_layer"][record.trial_id] = entry
                skipped.append(_not_per_layer(record))
            else:
                data["trials"][record.trial_id] = entry
                done += 1
            write_ablation(suite_dir, data)  # after every trial: an interrupted run resumes from here
    finally:
        if bar is not None:
            bar.close()
    for reason in skipped:
        log(f"skipped: {reason}")
    log(f"ablated {done} trial(s) in {time.perf_counter() - t0:.0f} s -> {suite_dir / ABLATION_FILE}")
    return data


def _not_per_layer(record) -> str:
    return f"{record.spec.display} (trial {record.trial_id}) added nothing to the backbone's layers: not per-layer"


# -- the command ---------------------------------------------------------------------------------
def cmd_ablate(args) -> int:
    from peftbench.contract.registry import get_registry
    from peftbench.report.render import write_report
    from peftbench.results.store import Store
    from peftbench.running.flags import split_list
    from peftbench.running.suite_dir import STORE_FILE

    suite_dir = Path(args.suite_dir).expanduser()
    if not (suite_dir / STORE_FILE).is_file():
        raise ConfigError(f"{suite_dir} is not a suite folder: it holds no {STORE_FILE}")
    registry = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give a positive number of torch CPU threads")
        torch.set_num_threads(args.threads)
    ablate(suite_dir, split_list(args.method) or None, args.budget, args.task, args.backbone, args.device,
           args.batch_size, registry, quiet=args.quiet)
    if not args.no_report:
        with Store(suite_dir / STORE_FILE, create=False, registry=registry) as store:
            print(f"wrote {write_report(suite_dir, store, registry)}")
    return 0


def add_command(sub) -> None:
    """Register ``peftbench ablate`` on the ``peftbench`` command's subparsers."""
    p = sub.add_parser("ablate", help="switch a trained method off in every span of layers; heatmap of the metric drop")
    p.add_argument("suite_dir", metavar="SUITE_DIR", help="a finished suite's folder (its trials saved their weights)")
    p.add_argument("--method", action="append",
                   help="method(s) to ablate, comma-separated or repeated (default: every per-layer method there)")
    p.add_argument("--budget", help="only the trials at this budget (default: every budget)")
    p.add_argument("--task", help="only the trials of this task (default: every task)")
    p.add_argument("--backbone", help="only the trials on this backbone (default: every backbone)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="validation examples per forward pass (default: 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, every CPU; 1 is faster on a "
                                                 "busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="only write ablation.json, not the suite's report")
    p.set_defaults(func=cmd_ablate)
