"""A task's splits as a trial uses them: seeded subsamples, tokenized, cached per process.

``raw_data`` takes the suite's limits (the same subsample for every method and seed);
``encoded_data`` tokenizes for one backbone. Classification validation and test are sorted
by length (the metrics are order-free and batches then pad far less). Generation tasks
train on ``PROMPT`` + target and are evaluated by decoding from ``PROMPT``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftbench.tasks.entry import TaskEntry
from peftbench.tasks.resolve import get_task

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.results.records import TrainingSpec

#: generation tasks (causal LM): the model reads PROMPT, learns " " + target + eos after it
PROMPT = "{source} ||"

_TASKS: dict[tuple, object] = {}
_DATA: dict[tuple, object] = {}


def task_for(entry: TaskEntry, registry):
    """The Task of an entry (cached per process and registry: its data is read once)."""
    key = (entry.model_dump_json(), id(registry))
    if key not in _TASKS:
        _TASKS[key] = get_task(entry.name, registry, **entry.options())
    return _TASKS[key]


def backbone_task_kind(task) -> str:
    """The backbone head a task needs: a causal LM for generation, else a classifier."""
    return "causal_lm" if task.kind == "generation" else "classification"


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


def raw_data(task, entry: TaskEntry, cfg: "TrainingSpec"):
    """The task's splits with the suite's seeded limits (cached; loading also fixes the labels)."""
    key = (entry.model_dump_json(), id(task), cfg.train_limit, cfg.eval_limit, cfg.test_limit, cfg.data_seed)
    if key not in _DATA:
        raw = task.load(cfg.train_limit, cfg.eval_limit, cfg.data_seed)
        if cfg.test_limit != cfg.eval_limit:
            test = task.load(None, cfg.test_limit, cfg.data_seed)["test"]
            raw["test"] = test
        _DATA[key] = raw
    return _DATA[key]


def encoded_data(task, entry: TaskEntry, backbone, cfg: "TrainingSpec"):
    """Tokenized train (and validation/test for classification), cached per backbone and limits."""
    tok = backbone.tokenizer
    key = (entry.model_dump_json(), id(task), backbone.name, tok.padding_side, cfg.max_length, cfg.train_limit,
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
