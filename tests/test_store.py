"""The results store: lifecycle, rerun semantics, kill -9, JSON fields, readers, schema."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from peftbench.results.store import FINISHED, SCHEMA_VERSION, Store, StoreError, suite_dirs


def trial(i: int = 0, **extra) -> dict:
    return {"trial_id": f"t{i:03d}", "suite": "s", "task": "movie_sentiment", "backbone": "minilm",
            "method": "lora", "budget": "1%", "seed": i, "knob": "r", "knob_value": 8, "knob_step": 9216,
            "config": {"method": "lora", "lr": 5e-4, "seed": i}, "config_hash": f"h{i}", **extra}


RESULT = {"metrics": {"accuracy": 0.85}, "trainable_params": 73_728, "primary_metric": "accuracy",
          "direction": "max", "step_time_s": 0.25}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "suite" / "results.sqlite") as s:
        yield s


def test_create_sets_wal_and_schema_version(tmp_path):
    path = tmp_path / "deep" / "suite" / "results.sqlite"
    with Store(path) as s:
        assert path.is_file() and s.schema_version() == SCHEMA_VERSION and s.rows() == []
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    with pytest.raises(StoreError, match="no results store"):
        Store(tmp_path / "missing" / "results.sqlite", create=False)
    assert not (tmp_path / "missing").exists()


def test_lifecycle_start_finish_fail(store):
    assert store.get("t000") is None and not store.is_done("t000")
    store.start(trial(0))
    row = store.get("t000")
    assert row["status"] == "running" and row["attempts"] == 1 and row["started_at"] and row["finished_at"] is None
    assert not store.is_done("t000")
    store.finish("t000", RESULT)
    row = store.get("t000")
    assert row["status"] == "done" and row["finished_at"] and row["metrics"] == {"accuracy": 0.85}
    assert row["config"] == {"method": "lora", "lr": 5e-4, "seed": 0} and row["trainable_params"] == 73_728
    assert store.is_done("t000")

    store.start(trial(1))
    store.fail("t001", "diverged", "loss became NaN at step 12", {"steps": 12, "curves": [{"step": 10, "loss": 9.5}]})
    row = store.get("t001")
    assert (row["status"], row["error"], row["steps"]) == ("diverged", "loss became NaN at step 12", 12)
    assert not store.is_done("t001")  # diverged and failed trials run again


@pytest.mark.parametrize("status", ["failed", "diverged", "running"])
def test_rerun_retries_unfinished_rows(store, status):
    store.start(trial(0))
    if status != "running":
        store.fail("t000", status, "boom", {"metrics": {"accuracy": 0.1}})
    assert not store.is_done("t000")
    store.start(trial(0))  # the retry replaces the row: no stale error or metrics
    row = store.get("t000")
    assert (row["status"], row["error"], row["metrics"], row["attempts"]) == ("running", None, None, 2)
    store.finish("t000", RESULT)
    assert store.is_done("t000") and store.get("t000")["attempts"] == 2


@pytest.mark.parametrize("status", FINISHED)
def test_finished_rows_are_never_overwritten(store, status):
    if status == "done":
        store.start(trial(0))
        store.finish("t000", RESULT)
    else:  # an unreachable budget is recorded without starting a trial
        store.fail("t000", "unreachable", "not reachable: spans 10..20", {k: v for k, v in trial(0).items() if k != "trial_id"})
        assert store.get("t000")["method"] == "lora" and store.get("t000")["attempts"] == 1
    before = store.get("t000")
    assert store.is_done("t000")
    for attempt in (lambda: store.start(trial(0)), lambda: store.finish("t000", RESULT),
                    lambda: store.fail("t000", "failed", "late error")):
        with pytest.raises(StoreError, match=f"already {status}"):
            attempt()
    assert store.get("t000") == before


def test_bad_writes_are_refused(store):
    with pytest.raises(StoreError, match="never started"):
        store.finish("nope", RESULT)
    with pytest.raises(StoreError, match="status 'oops'"):
        store.fail("nope", "oops", "x")
    with pytest.raises(StoreError, match="unknown store field.*acuracy"):
        store.start(trial(0, acuracy=0.9))
    with pytest.raises(StoreError, match="no trial_id"):
        store.start({**trial(0), "trial_id": ""})
    store.start(trial(0))
    with pytest.raises(StoreError, match="unknown store field.*suite"):
        store.finish("t000", {**RESULT, "suite": "other"})  # identity is fixed at start
    assert store.get("t000")["status"] == "running"  # a refused write changes nothing


def test_json_fields_round_trip(store):
    metrics = {"accuracy": np.float32(0.5), "f1": float("nan"), "bleu": 68.25, "name": "émoji ✓"}
    curves = [{"step": np.int64(s), "loss": 1.0 / (s + 1), "val_metric": None} for s in range(3)]
    env = {"versions": {"torch": "2.13.0"}, "threads": np.int64(2), "path": Path("/tmp/x"), "list": [1, (2, 3)]}
    store.start(trial(0, trainable_params=np.int64(73_728), achieved_pct=np.float64(0.3246)))
    store.finish("t000", {"metrics": metrics, "val_metrics": {}, "curves": curves, "environment": env,
                          "quantized_bytes": None, "peak_mem_bytes": np.int64(2**40), "stored_bytes": 1})
    row = store.get("t000")
    assert row["metrics"]["accuracy"] == 0.5 and math.isnan(row["metrics"]["f1"])
    assert row["metrics"]["bleu"] == 68.25 and row["metrics"]["name"] == "émoji ✓"
    assert row["curves"] == [{"step": s, "loss": 1.0 / (s + 1), "val_metric": None} for s in range(3)]
    assert row["environment"] == {"versions": {"torch": "2.13.0"}, "threads": 2, "path": "/tmp/x", "list": [1, [2, 3]]}
    assert row["val_metrics"] == {} and row["quantized_bytes"] is None
    assert row["trainable_params"] == 73_728 and isinstance(row["trainable_params"], int)
    assert row["peak_mem_bytes"] == 2**40 and row["achieved_pct"] == pytest.approx(0.3246)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        store.start(trial(1, config={"bad": object()}))
    assert store.get("t001") is None  # nothing half-written


def test_reopen_keeps_everything_and_rows_filter(tmp_path):
    path = tmp_path / "suite" / "results.sqlite"
    with Store(path) as s:
        for i in range(4):
            s.start(trial(i, suite="a" if i % 2 else "b"))
            if i < 3:
                s.finish(f"t{i:03d}", RESULT)
        before = s.rows()
    with Store(path) as s:  # reopening creates nothing, drops nothing
        assert s.rows() == before and len(before) == 4
        assert [r["trial_id"] for r in s.rows(suite="a")] == ["t001", "t003"]
        assert [s.is_done(f"t{i:03d}") for i in range(4)] == [True, True, True, False]
    assert suite_dirs(tmp_path) == ["suite"] and suite_dirs(tmp_path / "none") == []


KILLED = """
import sys, time
from peftbench.results.store import Store
store = Store(sys.argv[1])
t = lambda i: {"trial_id": f"k{i}", "suite": "s", "task": "t", "backbone": "b", "method": "lora", "seed": i}
store.start(t(0)); store.finish("k0", {"metrics": {"accuracy": 0.9}})
store.start(t(1))
print("ready", flush=True)
time.sleep(60)
"""


def test_kill_9_loses_only_the_trial_in_flight(tmp_path):
    path = tmp_path / "results.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Store(path) as s:
        assert s.is_done("k0") and s.get("k0")["metrics"] == {"accuracy": 0.9}
        assert s.get("k1")["status"] == "running" and not s.is_done("k1")
        s.start({"trial_id": "k1", "suite": "s", "task": "t", "backbone": "b", "method": "lora", "seed": 1})
        s.finish("k1", {"metrics": {"accuracy": 0.8}})
        assert s.get("k1")["attempts"] == 2 and s.is_done("k1")


def test_concurrent_readers_see_only_whole_rows(tmp_path):
    path = tmp_path / "results.sqlite"
    writer = Store(path)
    n, seen, errors = 60, [], []
    ready = threading.Barrier(4, timeout=60)  # the writer starts once every reader has read once

    def read():
        with Store(path) as r:
            first = True
            while True:
                rows = r.rows()
                for row in rows:  # a 'done' row always carries its result (one transaction)
                    if row["status"] == "done" and row["metrics"] != {"accuracy": row["seed"] / n}:
                        errors.append(row)
                seen.append(len(rows))
                if first:
                    first = False
                    ready.wait()
                if sum(row["status"] == "done" for row in rows) == n:
                    return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    ready.wait()
    for i in range(n):
        writer.start(trial(i))
        writer.finish(f"t{i:03d}", {"metrics": {"accuracy": i / n}})
    for t in readers:
        t.join(timeout=60)
    writer.close()
    assert not any(t.is_alive() for t in readers) and errors == []
    assert min(seen) == 0 and max(seen) == n  # the readers read before, (while) and after the writes


def test_schema_versions(tmp_path):
    newer = tmp_path / "newer.sqlite"
    Store(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 999, newer"):
        Store(newer)

    older = tmp_path / "older.sqlite"  # a store from before knob_step/attempts existed
    db = sqlite3.connect(older)
    db.execute("CREATE TABLE trials (trial_id TEXT PRIMARY KEY, suite TEXT, method TEXT, status TEXT, metrics TEXT)")
    db.execute("INSERT INTO trials VALUES ('old', 's', 'lora', 'done', '{\"accuracy\": 0.7}')")
    db.commit()
    db.close()
    with Store(older) as s:
        row = s.get("old")
        assert s.schema_version() == SCHEMA_VERSION and s.is_done("old")
        assert row["metrics"] == {"accuracy": 0.7} and row["knob_step"] is None and row["attempts"] == 0
