"""The results store: one SQLite row per trial, written only by the driver (rank 0).

The columns come from the records (``results.records``): one per ``TrialSpec`` field, the
trial's state, one per ``TrialResult`` field; nested values are JSON. Readers get typed
``TrialRecord`` objects back, never raw JSON.

Each write is one committed transaction, so a run killed with ``kill -9`` loses only the
trial in flight: its row stays ``running`` and ``is_done`` says it must run again. Finished
rows (``done``, ``unreachable``) are never overwritten; ``failed`` and ``diverged`` rows are
retried on the next run (``attempts`` counts the tries). WAL mode lets the report (or
several readers) read while a run writes. A search trial never stores a test metric.

The ``claims`` table says which process runs what now (``running.claims``): ``claim`` starts a
trial only when no other live process holds it, in the same transaction, so several runs on
one store never train a trial twice; only the holder may ``finish``/``fail`` it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from peftbench.errors import PeftbenchError
from peftbench.results import migrate
from peftbench.results.leases import CLAIMS, Leases, Live, create_claims, now, retry_locked
from peftbench.results.records import TrialRecord, TrialResult, TrialSpec

SCHEMA_VERSION = 2
FINISHED = ("done", "unreachable")  # a rerun skips these; the others run again
FAILURES = ("failed", "diverged", "unreachable")
TABLE = "trials"


class StoreError(PeftbenchError):
    """The store refuses a write that would lose data, or cannot be read."""


class ClaimLost(StoreError):
    """Another process took over a trial this one was running (its heartbeat had gone stale)."""


# -- columns, from the records ---------------------------------------------------------------
def _sql_type(annotation) -> str:
    """INTEGER / REAL / TEXT for scalars (optional or not), JSON for anything nested."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal or annotation is str:
        return "TEXT"
    if annotation in (int, bool):
        return "INTEGER"
    if annotation is float:
        return "REAL"
    return "JSON"


def _columns(model: type[BaseModel]) -> dict[str, str]:
    return {name: _sql_type(field.annotation) for name, field in model.model_fields.items()}


SPEC_COLUMNS = _columns(TrialSpec)
STATE_COLUMNS = {"status": "TEXT", "error": "TEXT", "attempts": "INTEGER", "started_at": "TEXT", "finished_at": "TEXT"}
RESULT_COLUMNS = _columns(TrialResult)
COLUMNS = {"trial_id": "TEXT", "config_hash": "TEXT", **SPEC_COLUMNS, **STATE_COLUMNS, **RESULT_COLUMNS}
assert len(COLUMNS) == 2 + len(SPEC_COLUMNS) + len(STATE_COLUMNS) + len(RESULT_COLUMNS), "records share a field name"


def _plain(value: Any) -> Any:
    """numpy/torch scalars and Paths as plain JSON values."""
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes, list, tuple, dict)):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def _encode(model: BaseModel, columns: dict[str, str]) -> dict[str, Any]:
    """Column values of ``model``: JSON text for nested fields (NaN kept), plain values else."""
    data = model.model_dump()
    out = {}
    for name, kind in columns.items():
        value = data[name]
        if value is not None and kind == "JSON":
            value = json.dumps(value, sort_keys=True, default=_plain)
        elif isinstance(value, float) and math.isnan(value):
            value = None
        out[name] = value
    return out


def _decode(row: sqlite3.Row, columns: dict[str, str]) -> dict[str, Any]:
    """The fields of ``columns`` that the row holds; a column the store lacks (a field added since, in a store
    opened read-only, which cannot gain it) is left to the field's default."""
    present = set(row.keys())
    out = {}
    for name, kind in columns.items():
        value = row[name] if name in present else None
        if value is not None:
            out[name] = json.loads(value) if kind == "JSON" else value
    return out


def _record(row: sqlite3.Row) -> TrialRecord:
    result = _decode(row, RESULT_COLUMNS)
    return TrialRecord(
        trial_id=row["trial_id"], spec=TrialSpec(**_decode(row, SPEC_COLUMNS)), status=row["status"],
        error=row["error"], attempts=row["attempts"] or 0, started_at=row["started_at"],
        finished_at=row["finished_at"],
        result=TrialResult(**result) if result else None,
    )


def unreadable(path: Path, exc: Exception) -> str:
    """The one-line error for a file that is not a readable results store."""
    return (f"{path} is not a readable peftbench results store (SQLite: {exc}); nothing was changed; move the "
            f"file away (or restore it from a copy), or choose another suite with --suite NAME or --out DIR")


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection; a store in a read-only folder (no WAL index can be made) is opened immutable."""
    uri = path.absolute().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def check_store(path: Path) -> None:
    """An error when the file at ``path`` is not a results store SQLite can read (nothing is written).

    Opened immutable: a read-only connection to a WAL store would leave a ``-shm`` file behind.
    """
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?immutable=1", uri=True)
        try:
            conn.execute("SELECT name FROM sqlite_master").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(unreadable(path, exc)) from None


class Store(Leases):
    """``<out>/<suite>/results.sqlite``. ``create=False`` refuses a missing file.

    ``registry`` (optional) lets a store written by an older peftbench be migrated with what
    today's methods declare (their reference-baseline role).
    """

    def __init__(self, path: str | Path, create: bool = True, registry=None, readonly: bool = False):
        self.path = Path(path)
        if (readonly or not create) and not self.path.is_file():
            raise StoreError(f"no results store at {self.path}")
        self._lock = threading.Lock()
        try:
            if readonly:
                self._conn = _connect_readonly(self.path)
                self._check_readonly()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.is_file()
            self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA busy_timeout = 60000")
            self._journal(os.environ.get("PEFTBENCH_STORE_JOURNAL") or (None if existed else "wal"))
            self._conn.execute("PRAGMA synchronous = FULL")  # a finished trial survives a power cut too
            # another process opening the same new store may hold it without SQLite's busy wait applying
            if retry_locked(lambda: self._open_schema(registry)):
                self._conn.execute("VACUUM")  # the old table's pages go back: a migrated store is no larger than needed
        except sqlite3.DatabaseError as exc:
            raise StoreError(unreadable(self.path, exc)) from None

    def _journal(self, wanted: str | None) -> None:
        """WAL (readers never wait; every process on one machine) or a rollback journal (``delete``: processes
        on several machines sharing the folder, where the filesystem's locks work); None: keep the file's."""
        if wanted is None:
            return
        wanted = wanted.lower()
        if wanted not in ("wal", "delete"):
            raise StoreError(f"PEFTBENCH_STORE_JOURNAL={wanted!r} is not one of wal, delete")
        mode = retry_locked(lambda: self._conn.execute(f"PRAGMA journal_mode = {wanted.upper()}").fetchone()[0])
        if wanted == "delete" and mode != "delete":
            self._conn.close()
            raise StoreError(f"{self.path} stays in WAL mode while another process has it open; "
                             f"PEFTBENCH_STORE_JOURNAL=delete needs every process on the suite started with it")

    def _check_readonly(self) -> None:
        """A store opened read-only must already hold today's schema (nothing can be migrated)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 1
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version} and this peftbench reads {SCHEMA_VERSION}; "
                             f"it is read-only, so it cannot be migrated here: copy the suite folder somewhere "
                             f"writable and run the command there")

    # -- schema --------------------------------------------------------------------------
    def _open_schema(self, registry) -> bool:
        """Create or check the schema, migrating an older store; True when it migrated."""
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
            has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (TABLE,)).fetchone()
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}, newer than this peftbench reads "
                                 f"({SCHEMA_VERSION}); upgrade peftbench")
            if has_table and (version or 1) < SCHEMA_VERSION:
                try:
                    rows = migrate.v1_rows(db, TABLE, registry)
                except (ValueError, ValidationError, KeyError, TypeError) as exc:
                    raise StoreError(f"{self.path} has schema version {version or 1}, which this peftbench "
                                     f"({SCHEMA_VERSION}) cannot migrate: {exc}") from None
                db.execute(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_v1")
                self._create(db)
                for record in rows:
                    self._insert(db, record)
                db.execute(f"DROP TABLE {TABLE}_v1")
                migrated = True
            else:
                self._create(db)
                migrated = False
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return migrated

    @staticmethod
    def _create(db) -> None:
        columns = ", ".join(f"{name} {kind.replace('JSON', 'TEXT')}" + (" PRIMARY KEY" if name == "trial_id" else "")
                            for name, kind in COLUMNS.items())
        db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({columns})")
        present = {r[1] for r in db.execute(f"PRAGMA table_info({TABLE})")}
        for name in [c for c in COLUMNS if c not in present]:  # a field added since: a new column, empty (its default)
            db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {COLUMNS[name].replace('JSON', 'TEXT')}")
        db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_suite ON {TABLE} (suite)")
        create_claims(db)

    @staticmethod
    def _insert(db, record: TrialRecord, replace: bool = False) -> None:
        values = {"trial_id": record.trial_id, "config_hash": record.spec.config_hash,
                  **_encode(record.spec, SPEC_COLUMNS),
                  "status": record.status, "error": record.error, "attempts": record.attempts,
                  "started_at": record.started_at, "finished_at": record.finished_at,
                  **(_encode(record.result, RESULT_COLUMNS) if record.result is not None
                     else dict.fromkeys(RESULT_COLUMNS))}
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        db.execute(f"{verb} INTO {TABLE} ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                   tuple(values.values()))

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
    def get(self, trial_id: str) -> TrialRecord | None:
        with self._lock:
            row = self._conn.execute(f"SELECT * FROM {TABLE} WHERE trial_id = ?", (trial_id,)).fetchone()
        return None if row is None else _record(row)

    def records(self, suite: str | None = None) -> list[TrialRecord]:
        """Every trial (of one suite), in a stable order."""
        with self._lock:
            if suite is None:
                found = self._conn.execute(f"SELECT * FROM {TABLE}").fetchall()
            else:
                found = self._conn.execute(f"SELECT * FROM {TABLE} WHERE suite = ?", (suite,)).fetchall()
        records = [_record(r) for r in found]
        return sorted(records, key=lambda r: (r.spec.suite, r.spec.task.name, r.spec.backbone, r.spec.method,
                                              r.spec.budget is not None, r.spec.budget or "", r.spec.seed,
                                              r.spec.role, r.trial_id))

    def is_done(self, trial_id: str) -> bool:
        """True for ``done`` and ``unreachable`` rows; running/failed/diverged run again."""
        with self._lock:
            row = self._conn.execute(f"SELECT status FROM {TABLE} WHERE trial_id = ?", (trial_id,)).fetchone()
        return row is not None and row["status"] in FINISHED

    # -- writes --------------------------------------------------------------------------
    def start(self, spec: TrialSpec) -> None:
        """Record a trial as running (a retry of a failed/diverged/killed row replaces it)."""
        with self._write() as db:
            self._start(db, spec)

    def _start(self, db, spec: TrialSpec) -> None:
        if not isinstance(spec, TrialSpec):
            raise StoreError(f"Store.start takes a TrialSpec, not {type(spec).__name__}")
        old = db.execute(f"SELECT status, attempts FROM {TABLE} WHERE trial_id = ?", (spec.trial_id,)).fetchone()
        if old is not None and old["status"] in FINISHED:
            raise StoreError(f"trial {spec.trial_id} is already {old['status']}; refusing to overwrite it")
        record = TrialRecord(trial_id=spec.trial_id, spec=spec, status="running", started_at=now(),
                             attempts=(old["attempts"] or 0 if old else 0) + 1)
        self._insert(db, record, replace=True)

    # -- claims: several processes on one store ---------------------------------------------
    def claim(self, spec: TrialSpec, owner: str, live: Live, since: str | None = None) -> str:
        """Start ``spec`` for ``owner`` in one transaction, unless it is ``finished``, or was ``tried``
        (failed/diverged) at or after ``since``, or is ``held`` by another process that ``live(owner,
        heartbeat_at)`` says still runs; returns that word, or ``claimed``."""
        with self._write() as db:
            old = db.execute(f"SELECT status, finished_at FROM {TABLE} WHERE trial_id = ?", (spec.trial_id,)).fetchone()
            if old is not None and old["status"] in FINISHED:
                return "finished"
            if since and old is not None and old["status"] in FAILURES and (old["finished_at"] or "") >= since:
                return "tried"
            if not self._take(db, spec.trial_id, owner, live):
                return "held"
            self._start(db, spec)
        return "claimed"

    def unreachable(self, spec: TrialSpec) -> None:
        """Record a trial whose budget its method cannot reach (it never runs; the note says why)."""
        with self._write() as db:
            old = db.execute(f"SELECT status FROM {TABLE} WHERE trial_id = ?", (spec.trial_id,)).fetchone()
            if old is not None and old["status"] in FINISHED:
                raise StoreError(f"trial {spec.trial_id} is already {old['status']}; refusing to overwrite it")
            stamp = now()
            self._insert(db, TrialRecord(trial_id=spec.trial_id, spec=spec, status="unreachable", error=spec.note,
                                         attempts=1, started_at=stamp, finished_at=stamp), replace=True)

    def finish(self, trial_id: str, result: TrialResult, owner: str | None = None) -> None:
        """Record a started trial as done with its metrics and costs (one transaction); ``owner``: only
        while that process holds its claim, which ends here."""
        self._close(trial_id, "done", None, result, owner)

    def fail(self, trial_id: str, status: str, error: str, result: TrialResult | None = None,
             owner: str | None = None) -> None:
        """Record ``failed``/``diverged`` with the reason and what the trial got so far."""
        if status not in ("failed", "diverged"):
            raise StoreError(f"Store.fail: status {status!r} is not one of failed, diverged")
        self._close(trial_id, status, str(error), result, owner)

    def _close(self, trial_id: str, status: str, error: str | None, result: TrialResult | None,
               owner: str | None) -> None:
        if result is not None and not isinstance(result, TrialResult):
            raise StoreError(f"Store.{'finish' if status == 'done' else 'fail'} takes a TrialResult, "
                             f"not {type(result).__name__}")
        with self._write() as db:
            old = db.execute(f"SELECT * FROM {TABLE} WHERE trial_id = ?", (trial_id,)).fetchone()
            if old is None:
                raise StoreError(f"trial {trial_id} was never started; call Store.start first")
            held = db.execute(f"SELECT owner FROM {CLAIMS} WHERE key = ?", (trial_id,)).fetchone()
            if owner is not None and (held is None or held["owner"] != owner):
                raise ClaimLost(f"trial {trial_id} was taken over by {held['owner'] if held else 'another process'} "
                                f"while this process ran it (its heartbeat had gone stale); this result is not kept")
            if old["status"] in FINISHED:
                raise StoreError(f"trial {trial_id} is already {old['status']}; refusing to overwrite it")
            record = _record(old)
            if record.spec.role == "search" and result is not None and result.metrics:
                raise StoreError(f"trial {trial_id} is a search trial: it is selected on validation only and "
                                 f"stores no test metric (got {sorted(result.metrics)})")
            record = record.model_copy(update={"status": status, "error": error, "finished_at": now(),
                                               "result": result})
            self._insert(db, record, replace=True)
            if owner is not None:
                db.execute(f"DELETE FROM {CLAIMS} WHERE key = ?", (trial_id,))

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
