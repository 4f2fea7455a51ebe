"""The results store: one SQLite row per trial, written only by the driver (rank 0).

Each write is one committed transaction, so a run killed with ``kill -9`` loses only the
trial in flight: its row stays ``running`` and ``is_done`` says it must run again. Finished
rows (``done``, ``unreachable``) are never overwritten; ``failed`` and ``diverged`` rows are
retried on the next run (``attempts`` counts the tries). WAL mode lets the report (or
several readers) read while a run writes.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftbench.errors import PeftbenchError

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "diverged", "unreachable")
FINISHED = ("done", "unreachable")  # a rerun skips these; the others run again
FAILURES = ("failed", "diverged", "unreachable")

# column -> SQL type; JSON columns hold dicts/lists (encoded with sorted keys)
IDENTITY = {
    "trial_id": "TEXT PRIMARY KEY", "suite": "TEXT", "task": "TEXT", "backbone": "TEXT", "method": "TEXT",
    "budget": "TEXT", "seed": "INTEGER", "knob": "TEXT", "knob_value": "INTEGER",
    # parameters one knob step adds near the solved value (the budget's granularity)
    "knob_step": "INTEGER", "config": "JSON", "config_hash": "TEXT",
}
STATE = {"status": "TEXT NOT NULL", "error": "TEXT", "attempts": "INTEGER NOT NULL DEFAULT 0"}
RESULT = {
    "primary_metric": "TEXT", "direction": "TEXT", "metrics": "JSON", "val_metrics": "JSON",
    "trainable_params": "INTEGER", "head_params": "INTEGER", "base_params": "INTEGER", "achieved_pct": "REAL",
    "target_params": "INTEGER", "stored_params": "INTEGER", "stored_bytes": "INTEGER",
    "quantized_bytes": "INTEGER", "step_time_s": "REAL", "peak_mem_bytes": "INTEGER", "mem_kind": "TEXT",
    "inference_overhead": "REAL", "train_time_s": "REAL", "steps": "INTEGER", "curves": "JSON",
    "environment": "JSON", "artifacts": "TEXT",
}
TIMES = {"started_at": "TEXT", "finished_at": "TEXT"}
COLUMNS = {**IDENTITY, **STATE, **RESULT, **TIMES}
JSON_COLUMNS = {name for name, kind in COLUMNS.items() if kind == "JSON"}
# what start() accepts (a trial) and what finish()/fail() accept (a result)
TRIAL_KEYS = set(IDENTITY) | set(RESULT)
RESULT_KEYS = set(RESULT) | {"knob", "knob_value", "knob_step"}


class StoreError(PeftbenchError):
    """The store refuses a write that would lose data, or cannot be read."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """numpy/torch scalars and Paths as plain JSON/SQLite values."""
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes, list, tuple, dict)):
        return item()
    return value


def _json_default(value: Any) -> Any:
    plain = _plain(value)
    if plain is value:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")
    return plain


def _encode(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in JSON_COLUMNS:
        return json.dumps(value, sort_keys=True, default=_json_default)
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value) and COLUMNS[column] == "INTEGER":
        return None
    return value


def _decode(row: sqlite3.Row) -> dict:
    out = {}
    for key in row.keys():
        value = row[key]
        out[key] = json.loads(value) if key in JSON_COLUMNS and value is not None else value
    return out


def _check_keys(what: str, data: dict, allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise StoreError(f"{what}: unknown store field(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


class Store:
    """``<out>/<suite>/results.sqlite``. ``create=False`` refuses a missing file."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"no results store at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 60000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")  # a finished trial survives a power cut too
        self._migrate()

    # -- schema --------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this peftbench reads ({SCHEMA_VERSION}); "
                    "upgrade peftbench"
                )
            columns = ", ".join(f"{name} {kind.replace('JSON', 'TEXT')}" for name, kind in COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS trials ({columns})")
            present = {r[1] for r in db.execute("PRAGMA table_info(trials)")}
            for name, kind in COLUMNS.items():  # additive migration: new nullable columns only
                if name not in present:
                    db.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind.replace('JSON', 'TEXT').replace(' NOT NULL', '')}")
            db.execute("CREATE INDEX IF NOT EXISTS trials_suite ON trials (suite)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    @contextmanager
    def _write(self):
        """One IMMEDIATE transaction under the writer lock: committed whole or not at all."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------
    def get(self, trial_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
        return None if row is None else _decode(row)

    def rows(self, suite: str | None = None) -> list[dict]:
        """Every row (of one suite), in a stable order."""
        order = "ORDER BY suite, task, backbone, method, budget, seed, trial_id"
        with self._lock:
            if suite is None:
                found = self._conn.execute(f"SELECT * FROM trials {order}").fetchall()
            else:
                found = self._conn.execute(f"SELECT * FROM trials WHERE suite = ? {order}", (suite,)).fetchall()
        return [_decode(r) for r in found]

    def is_done(self, trial_id: str) -> bool:
        """True for ``done`` and ``unreachable`` rows; running/failed/diverged run again."""
        row = self.get(trial_id)
        return row is not None and row["status"] in FINISHED

    # -- writes --------------------------------------------------------------------------
    def start(self, trial: dict) -> None:
        """Record a trial as running (a retry of a failed/diverged/killed row replaces it)."""
        _check_keys("Store.start", trial, TRIAL_KEYS)
        if not trial.get("trial_id"):
            raise StoreError("Store.start: the trial has no trial_id")
        with self._write() as db:
            old = db.execute("SELECT status, attempts FROM trials WHERE trial_id = ?", (trial["trial_id"],)).fetchone()
            if old is not None and old["status"] in FINISHED:
                raise StoreError(f"trial {trial['trial_id']} is already {old['status']}; refusing to overwrite it")
            values = {name: None for name in COLUMNS}
            values.update({k: _encode(k, v) for k, v in trial.items()})
            values.update(status="running", error=None, started_at=now(), finished_at=None,
                          attempts=(old["attempts"] if old else 0) + 1)
            names = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            db.execute(f"INSERT OR REPLACE INTO trials ({names}) VALUES ({marks})", tuple(values.values()))

    def finish(self, trial_id: str, result: dict) -> None:
        """Record a started trial as done with its metrics and costs (one transaction)."""
        self._close(trial_id, "done", None, result)

    def fail(self, trial_id: str, status: str, error: str, result: dict | None = None) -> None:
        """Record ``failed``/``diverged``/``unreachable`` with the reason.

        An ``unreachable`` trial never started: then ``result`` carries its identity fields
        (suite, task, backbone, method, budget, seed, ...) and a row is created.
        """
        if status not in FAILURES:
            raise StoreError(f"Store.fail: status {status!r} is not one of {', '.join(FAILURES)}")
        self._close(trial_id, status, str(error), result or {})

    def _close(self, trial_id: str, status: str, error: str | None, result: dict) -> None:
        allowed = TRIAL_KEYS if status == "unreachable" else RESULT_KEYS
        _check_keys(f"Store.{'finish' if status == 'done' else 'fail'}", result, allowed - {"trial_id"})
        with self._write() as db:
            old = db.execute("SELECT status FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
            if old is None and status != "unreachable":
                raise StoreError(f"trial {trial_id} was never started; call Store.start first")
            if old is not None and old["status"] in FINISHED:
                raise StoreError(f"trial {trial_id} is already {old['status']}; refusing to overwrite it")
            values = {k: _encode(k, v) for k, v in result.items()}
            values.update(status=status, error=error, finished_at=now())
            if old is None:
                values.update(trial_id=trial_id, attempts=1, started_at=values["finished_at"])
                names = ", ".join(values)
                db.execute(f"INSERT INTO trials ({names}) VALUES ({', '.join('?' for _ in values)})",
                           tuple(values.values()))
            else:
                sets = ", ".join(f"{k} = ?" for k in values)
                db.execute(f"UPDATE trials SET {sets} WHERE trial_id = ?", (*values.values(), trial_id))

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def suite_dirs(out: str | Path) -> list[str]:
    """Names of the suites under ``out`` that hold a results store."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if (p / "results.sqlite").is_file())
