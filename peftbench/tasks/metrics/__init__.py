"""peftbench's metrics, each an ``evaluate`` module file beside this one (no hub needed).

    load_metric("accuracy")            # an evaluate.EvaluationModule
    compute_metrics(task, predictions, references) -> {"accuracy": 0.91, ...}

Scales: accuracy, macro_f1 in 0..1; mcc in -1..1; bleu and rouge_l in 0..100 (as the
E2E papers report them). Each returns one key, its own name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from peftbench.errors import ConfigError, unknown

HERE = Path(__file__).resolve().parent

# name -> direction (which way is better)
METRICS = {"accuracy": "max", "macro_f1": "max", "mcc": "max", "bleu": "max", "rouge_l": "max"}
DEFAULTS = {"classification": ("accuracy", "macro_f1", "mcc"), "generation": ("bleu", "rouge_l")}
TEXT_METRICS = ("bleu", "rouge_l")


def module_path(name: str) -> Path:
    if name not in METRICS:
        raise ConfigError(unknown("metric", name, METRICS))
    return HERE / f"{name}.py"


@lru_cache(maxsize=None)
def load_metric(name: str):
    """The evaluate module for ``name``, loaded from its file here (kept in memory)."""
    import evaluate

    return evaluate.load(str(module_path(name)), keep_in_memory=True)


def _label_ids(task, values, what: str) -> list[int]:
    index = {name: i for i, name in enumerate(task.labels)}
    ids = []
    for v in values:
        if isinstance(v, str):
            if v not in index:
                raise ConfigError(f"task {task.name!r}: {what} label {v!r} is not one of {list(task.labels)}")
            ids.append(index[v])
        else:
            ids.append(int(v))
    return ids


def compute_metrics(task, predictions, references) -> dict[str, float]:
    """Every metric the task declares, as ``{name: value}``.

    Classification: label ids or names. Generation: prediction strings, and per prediction
    a reference string or a list of reference strings.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ConfigError(f"task {task.name!r}: {len(predictions)} predictions for {len(references)} references")
    if task.kind == "classification":
        predictions = _label_ids(task, predictions, "predicted")
        references = _label_ids(task, references, "reference")
    results: dict[str, float] = {}
    for name in task.metrics:
        results.update(load_metric(name).compute(predictions=predictions, references=references))
    return results
