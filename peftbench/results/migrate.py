"""Reading a store written by peftbench before typed records (schema version 1).

Version 1 kept each trial's identity as a JSON ``config`` (task, backbone, method, method
config, budget, seed, lr, training) beside flat columns, and the 4-bit weight bytes in a
``quantized_bytes`` column. Here each old row becomes a ``TrialRecord``; its trial id is
kept as it was, so a rerun of the same command still finds its finished trials.
"""

from __future__ import annotations

import json

from peftbench.contract.costs import Cost
from peftbench.results.records import CurvePoint, TrainingSpec, TrialRecord, TrialResult, TrialSpec
from peftbench.tasks.entry import TaskEntry

#: the v1 column of the 4-bit methods' weight bytes, and the label today's methods give it
V1_QUANT_COLUMN, V1_QUANT_LABEL = "quantized_bytes", "4-bit weights"
V1_JSON = ("config", "metrics", "val_metrics", "curves", "environment")


def _reference(registry, method: str) -> str | None:
    if registry is None:
        return None
    try:
        return getattr(registry.method(method), "reference", None)
    except Exception:  # noqa: BLE001 - a method no longer installed has no declared role
        return None


def _row(row, names: set[str]) -> dict:
    out = {name: row[name] for name in names}
    for name in V1_JSON:
        if out.get(name) is not None:
            out[name] = json.loads(out[name])
    return out


def v1_record(r: dict, registry=None) -> TrialRecord:
    """One version-1 row (a dict of its columns) as a record."""
    config = r.get("config") or {}
    training = config.get("training") or {}
    lr = config.get("lr")
    if lr is None:
        raise ValueError(f"trial {r['trial_id']} records no learning rate")
    status = r.get("status") or "running"
    trainable = r.get("trainable_params") or 0
    spec = TrialSpec(
        suite=r.get("suite") or "", task=TaskEntry(**(config.get("task") or {"name": r.get("task") or ""})),
        backbone=r.get("backbone") or config.get("backbone") or "", method=r.get("method") or "",
        method_config=config.get("method_config") or {}, budget=r.get("budget"), seed=r.get("seed") or 0,
        lr=lr, training=TrainingSpec(**{k: v for k, v in training.items() if k in TrainingSpec.model_fields}),
        primary_metric=r.get("primary_metric") or "metric", direction=r.get("direction") or "max",
        knob=r.get("knob"), knob_value=r.get("knob_value"), knob_step=r.get("knob_step"),
        target_params=r.get("target_params"), trainable_params=trainable,
        stored_params=r.get("stored_params") if r.get("stored_params") is not None else trainable,
        head_params=r.get("head_params") or 0, base_params=r.get("base_params") or 0,
        reference=_reference(registry, r.get("method") or ""), reachable=status != "unreachable",
        note=(r.get("error") or "") if status == "unreachable" else "",
    )
    result = None
    if status not in ("running", "unreachable"):
        quant = r.get(V1_QUANT_COLUMN)
        result = TrialResult(
            metrics=r.get("metrics") or {}, val_metrics=r.get("val_metrics") or {},
            stored_bytes=r.get("stored_bytes"),
            costs={V1_QUANT_LABEL: Cost(value=quant, unit="bytes")} if quant is not None else {},
            step_time_s=r.get("step_time_s"), peak_mem_bytes=r.get("peak_mem_bytes"), mem_kind=r.get("mem_kind"),
            inference_overhead=r.get("inference_overhead"), train_time_s=r.get("train_time_s"), steps=r.get("steps"),
            curves=[CurvePoint(**c) for c in r.get("curves") or []], environment=r.get("environment") or {},
            artifacts=r.get("artifacts"),
        )
    return TrialRecord(trial_id=r["trial_id"], spec=spec, status=status, error=r.get("error"),
                       attempts=r.get("attempts") or 0, started_at=r.get("started_at"),
                       finished_at=r.get("finished_at"), result=result)


def v1_rows(db, table: str, registry=None) -> list[TrialRecord]:
    """Every row of a version-1 ``table`` as records (raises on a row that cannot be read)."""
    names = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    return [v1_record(_row(row, names), registry) for row in db.execute(f"SELECT * FROM {table}").fetchall()]
