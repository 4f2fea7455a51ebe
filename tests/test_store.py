"""The results store: lifecycle, rerun semantics, kill -9, JSON fields, readers, schema."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import json

import numpy as np
import pytest
from pydantic import ValidationError

from peftbench.results.records import CurvePoint, TrainingSpec, TrialResult, TrialSpec
from peftbench.results.store import FINISHED, SCHEMA_VERSION, Store, StoreError, suite_dirs
from peftbench.tasks.entry import TaskEntry


def trial(i: int = 0, **extra) -> TrialSpec:
    """A planned trial (spec) whose seed is ``i``."""
    return TrialSpec(**{"suite": "s", "task": TaskEntry(name="movie_sentiment"), "backbone": "minilm",
                        "method": "lora", "method_config": {"r": 8}, "budget": "1%", "seed": i, "lr": 5e-4,
                        "primary_metric": "accuracy", "direction": "max", "knob": "r", "knob_value": 8,
                        "knob_step": 9216, "target_params": 227_132, "trainable_params": 73_728,
                        "stored_params": 73_728, "head_params": 1_538, "base_params": 22_713_216, **extra})


RESULT = TrialResult(metrics={"accuracy": 0.85}, step_time_s=0.25, best_step=25)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "suite" / "results.sqlite") as s:
        yield s


def test_create_sets_wal_and_schema_version(tmp_path):
    path = tmp_path / "deep" / "suite" / "results.sqlite"
    with Store(path) as s:
        assert path.is_file() and s.schema_version() == SCHEMA_VERSION and s.records() == []
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    columns = [r[1] for r in db.execute("PRAGMA table_info(trials)")]
    # the columns come from the records: every TrialSpec and TrialResult field, typed scalars where they are scalars
    assert set(TrialSpec.model_fields) <= set(columns) and set(TrialResult.model_fields) <= set(columns)
    assert {r[1]: r[2] for r in db.execute("PRAGMA table_info(trials)")}["lr"] == "REAL"
    with pytest.raises(StoreError, match="no results store"):
        Store(tmp_path / "missing" / "results.sqlite", create=False)
    assert not (tmp_path / "missing").exists()


def test_lifecycle_start_finish_fail(store):
    assert store.get(trial(0).trial_id) is None and not store.is_done(trial(0).trial_id)
    store.start(trial(0))
    row = store.get(trial(0).trial_id)
    assert row.status == "running" and row.attempts == 1 and row.started_at and row.finished_at is None
    assert row.spec == trial(0) and row.result is None and not store.is_done(row.trial_id)
    store.finish(row.trial_id, RESULT)
    row = store.get(trial(0).trial_id)
    assert row.status == "done" and row.finished_at and row.result == RESULT
    assert row.spec.lr == 5e-4 and row.spec.trainable_params == 73_728 and row.spec.achieved_pct == pytest.approx(0.3246, abs=1e-4)
    assert store.is_done(row.trial_id)

    store.start(trial(1))
    partial = TrialResult(steps=12, curves=[CurvePoint(step=10, loss=9.5)])
    store.fail(trial(1).trial_id, "diverged", "loss became NaN at step 12", partial)
    row = store.get(trial(1).trial_id)
    assert (row.status, row.error, row.result.steps) == ("diverged", "loss became NaN at step 12", 12)
    assert not store.is_done(row.trial_id)  # diverged and failed trials run again


@pytest.mark.parametrize("status", ["failed", "diverged", "running"])
def test_rerun_retries_unfinished_rows(store, status):
    tid = trial(0).trial_id
    store.start(trial(0))
    if status != "running":
        store.fail(tid, status, "boom", TrialResult(metrics={"accuracy": 0.1}))
    assert not store.is_done(tid)
    store.start(trial(0))  # the retry replaces the row: no stale error or metrics
    row = store.get(tid)
    assert (row.status, row.error, row.result, row.attempts) == ("running", None, None, 2)
    store.finish(tid, RESULT)
    assert store.is_done(tid) and store.get(tid).attempts == 2


@pytest.mark.parametrize("status", FINISHED)
def test_finished_rows_are_never_overwritten(store, status):
    tid = trial(0).trial_id
    if status == "done":
        store.start(trial(0))
        store.finish(tid, RESULT)
    else:  # an unreachable budget is recorded without starting a trial
        store.unreachable(trial(0, reachable=False, note="not reachable: spans 10..20"))
        assert store.get(tid).spec.method == "lora" and store.get(tid).attempts == 1
        assert store.get(tid).error == "not reachable: spans 10..20"
    before = store.get(tid)
    assert store.is_done(tid)
    for attempt in (lambda: store.start(trial(0)), lambda: store.finish(tid, RESULT),
                    lambda: store.fail(tid, "failed", "late error"), lambda: store.unreachable(trial(0))):
        with pytest.raises(StoreError, match=f"already {status}"):
            attempt()
    assert store.get(tid) == before


def test_bad_writes_are_refused(store):
    with pytest.raises(StoreError, match="never started"):
        store.finish("nope", RESULT)
    with pytest.raises(StoreError, match="status 'oops'"):
        store.fail("nope", "oops", "x")
    with pytest.raises(StoreError, match="takes a TrialSpec, not dict"):
        store.start({"trial_id": "t0", "method": "lora"})
    with pytest.raises(ValidationError, match="acuracy"):
        trial(0, acuracy=0.9)  # a misspelt field never reaches the store
    store.start(trial(0))
    with pytest.raises(StoreError, match="takes a TrialResult, not dict"):
        store.finish(trial(0).trial_id, {"metrics": {"accuracy": 0.9}, "suite": "other"})
    assert store.get(trial(0).trial_id).status == "running"  # a refused write changes nothing


def test_json_fields_round_trip(store):
    metrics = {"accuracy": np.float32(0.5), "f1": float("nan"), "bleu": 68.25}
    curves = [CurvePoint(step=np.int64(s), loss=1.0 / (s + 1)) for s in range(3)]
    env = {"versions": {"torch": "2.13.0"}, "threads": np.int64(2), "path": Path("/tmp/x"), "list": [1, (2, 3)],
           "name": "émoji ✓"}
    spec = trial(0, method_config={"r": 8, "targets": ("q", "v")}, trainable_params=np.int64(73_728))
    store.start(spec)
    store.finish(spec.trial_id, TrialResult(metrics=metrics, curves=curves, environment=env,
                                            peak_mem_bytes=np.int64(2**40), stored_bytes=1))
    row = store.get(spec.trial_id)
    assert row.spec == spec and row.spec.method_config == {"r": 8, "targets": ["q", "v"]}
    assert row.result.metrics["accuracy"] == 0.5 and math.isnan(row.result.metrics["f1"])
    assert row.result.metrics["bleu"] == 68.25
    assert row.result.curves == [CurvePoint(step=s, loss=1.0 / (s + 1)) for s in range(3)]
    assert row.result.environment == {"versions": {"torch": "2.13.0"}, "threads": 2, "path": "/tmp/x",
                                      "list": [1, [2, 3]], "name": "émoji ✓"}
    assert row.result.val_metrics == {} and row.result.costs == {}
    assert row.spec.trainable_params == 73_728 and isinstance(row.spec.trainable_params, int)
    assert row.result.peak_mem_bytes == 2**40
    with pytest.raises(TypeError, match="not JSON serialisable"):
        store.start(trial(1)) or store.finish(trial(1).trial_id, TrialResult(environment={"bad": object()}))
    assert store.get(trial(1).trial_id).status == "running"  # nothing half-written


def test_reopen_keeps_everything_and_rows_filter(tmp_path):
    path = tmp_path / "suite" / "results.sqlite"
    with Store(path) as s:
        for i in range(4):
            s.start(trial(i, suite="a" if i % 2 else "b"))
            if i < 3:
                s.finish(trial(i, suite="a" if i % 2 else "b").trial_id, RESULT)
        before = s.records()
    with Store(path) as s:  # reopening creates nothing, drops nothing
        assert s.records() == before and len(before) == 4
        assert [r.spec.seed for r in s.records(suite="a")] == [1, 3]
        assert [s.is_done(trial(i).trial_id) for i in range(4)] == [True, True, True, False]
    assert suite_dirs(tmp_path) == ["suite"] and suite_dirs(tmp_path / "none") == []


KILLED = """
import sys, time
from peftbench.results.records import TrialResult, TrialSpec
from peftbench.results.store import Store
store = Store(sys.argv[1])
t = lambda i: TrialSpec(suite="s", task={"name": "t"}, backbone="b", method="lora", seed=i, lr=1e-3,
                        primary_metric="accuracy", direction="max", trainable_params=1, stored_params=1,
                        head_params=0, base_params=10)
store.start(t(0)); store.finish(t(0).trial_id, TrialResult(metrics={"accuracy": 0.9}))
store.start(t(1))
print(t(0).trial_id, t(1).trial_id, flush=True)
time.sleep(60)
"""


def test_kill_9_loses_only_the_trial_in_flight(tmp_path):
    path = tmp_path / "results.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        k0, k1 = proc.stdout.readline().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Store(path) as s:
        assert s.is_done(k0) and s.get(k0).result.metrics == {"accuracy": 0.9}
        assert s.get(k1).status == "running" and not s.is_done(k1)
        spec = s.get(k1).spec
        s.start(spec)
        s.finish(k1, TrialResult(metrics={"accuracy": 0.8}))
        assert s.get(k1).attempts == 2 and s.is_done(k1)


def test_concurrent_readers_see_only_whole_rows(tmp_path):
    path = tmp_path / "results.sqlite"
    writer = Store(path)
    n, seen, errors = 60, [], []
    ready = threading.Barrier(4, timeout=60)  # the writer starts once every reader has read once

    def read():
        with Store(path) as r:
            first = True
            while True:
                rows = r.records()
                for row in rows:  # a 'done' row always carries its result (one transaction)
                    if row.status == "done" and row.result.metrics != {"accuracy": row.spec.seed / n}:
                        errors.append(row)
                seen.append(len(rows))
                if first:
                    first = False
                    ready.wait()
                if sum(row.status == "done" for row in rows) == n:
                    return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    ready.wait()
    for i in range(n):
        writer.start(trial(i))
        writer.finish(trial(i).trial_id, TrialResult(metrics={"accuracy": i / n}))
    for t in readers:
        t.join(timeout=60)
    writer.close()
    assert not any(t.is_alive() for t in readers) and errors == []
    assert min(seen) == 0 and max(seen) == n  # the readers read before, (while) and after the writes


V1_COLUMNS = ("trial_id TEXT PRIMARY KEY, suite TEXT, task TEXT, backbone TEXT, method TEXT, budget TEXT, seed INTEGER, "
              "knob TEXT, knob_value INTEGER, knob_step INTEGER, config TEXT, config_hash TEXT, status TEXT, error TEXT, "
              "attempts INTEGER, primary_metric TEXT, direction TEXT, metrics TEXT, val_metrics TEXT, "
              "trainable_params INTEGER, head_params INTEGER, base_params INTEGER, achieved_pct REAL, "
              "target_params INTEGER, stored_params INTEGER, stored_bytes INTEGER, quantized_bytes INTEGER, "
              "step_time_s REAL, peak_mem_bytes INTEGER, mem_kind TEXT, inference_overhead REAL, train_time_s REAL, "
              "steps INTEGER, curves TEXT, environment TEXT, artifacts TEXT, started_at TEXT, finished_at TEXT")


def test_schema_versions(tmp_path, registry):
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 999, newer"):
        Store(newer)

    # a version-1 store (peftbench before typed records): identity in a JSON config, 4-bit bytes in a column
    older = tmp_path / "older.sqlite"
    spec = trial(0, method="qlora", training=TrainingSpec(max_steps=50))
    config = json.dumps(spec.identity())
    db = sqlite3.connect(older)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute(f"CREATE TABLE trials ({V1_COLUMNS})")
    db.execute("INSERT INTO trials (trial_id, suite, task, backbone, method, budget, seed, knob, knob_value, config, "
               "status, attempts, primary_metric, direction, metrics, trainable_params, head_params, base_params, "
               "target_params, stored_params, quantized_bytes, curves) VALUES (?, 's', 'movie_sentiment', 'minilm', "
               "'qlora', '1%', 0, 'r', 8, ?, 'done', 1, 'accuracy', 'max', '{\"accuracy\": 0.7}', 73728, 1538, "
               "22713216, 227132, 73728, 5516208, '[{\"step\": 5, \"loss\": 0.6, \"val_metric\": null}]')",
               (spec.trial_id, config))
    db.execute("INSERT INTO trials (trial_id, suite, method, seed, config, status) VALUES ('broken', 's', 'full', 0, "
               "'{}', 'done')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 1, which this peftbench .2. cannot migrate.*broken"):
        Store(older)  # a row without its learning rate cannot become a typed record: refused, nothing changed
    db = sqlite3.connect(older)
    assert db.execute("SELECT value FROM meta").fetchone()[0] == "1"
    db.execute("DELETE FROM trials WHERE trial_id = 'broken'")
    db.commit()
    db.close()
    with Store(older, registry=registry) as s:
        row = s.get(spec.trial_id)
        assert s.schema_version() == SCHEMA_VERSION and s.is_done(spec.trial_id)
        assert row.spec.lr == 5e-4 and row.spec.training.max_steps == 50 and row.spec.trial_id == spec.trial_id
        assert row.result.metrics == {"accuracy": 0.7} and row.result.costs["4-bit weights"].value == 5516208
        assert row.result.curves == [CurvePoint(step=5, loss=0.6)] and row.spec.knob_step is None


def test_a_field_added_to_the_records_is_a_new_empty_column(tmp_path):
    path = tmp_path / "results.sqlite"
    with Store(path) as s:
        s.start(trial(0))
        s.finish(trial(0).trial_id, RESULT)
    db = sqlite3.connect(path)  # a store written before TrialResult.pruned and TrialSpec.matched existed
    db.execute("ALTER TABLE trials DROP COLUMN pruned")
    db.execute("ALTER TABLE trials DROP COLUMN matched")
    db.commit()
    db.close()
    with Store(path) as s:
        row = s.get(trial(0).trial_id)
        assert row.result.pruned is False and row.spec.matched is True and row.result.metrics == {"accuracy": 0.85}
