"""The store's ``claims`` table: which process holds what now (a trial it runs, or a lease such as
the report's writing), since when, and its last heartbeat.

``Store`` mixes these methods in (they use its connection and writer lock). Whether a holder
still lives is the caller's policy (``running.claims``), passed in as ``live(owner,
heartbeat_at)``: a key held by a dead process is taken over.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from typing import Callable

CLAIMS = "claims"
Live = Callable[[str, float], bool]  # (owner, heartbeat_at: seconds since the epoch) -> does it still run?


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def create_claims(db) -> None:
    db.execute(f"CREATE TABLE IF NOT EXISTS {CLAIMS} (key TEXT PRIMARY KEY, owner TEXT NOT NULL, "
               f"claimed_at TEXT NOT NULL, heartbeat_at REAL NOT NULL)")


class Leases:
    """The claims table's reads and writes, each one transaction (``_write``) under the store's lock."""

    def lease(self, key: str, owner: str, live: Live, claimed_at: str | None = None) -> bool:
        """Hold ``key`` (not a trial: e.g. the report's writing) for ``owner`` unless another live process does."""
        with self._write() as db:
            return self._take(db, key, owner, live, claimed_at)

    @staticmethod
    def _take(db, key: str, owner: str, live, claimed_at: str | None = None) -> bool:
        row = db.execute(f"SELECT owner, heartbeat_at FROM {CLAIMS} WHERE key = ?", (key,)).fetchone()
        if row is not None and row["owner"] != owner and live(row["owner"], row["heartbeat_at"]):
            return False
        db.execute(f"INSERT OR REPLACE INTO {CLAIMS} VALUES (?, ?, ?, ?)", (key, owner, claimed_at or now(), time.time()))
        return True

    def claims(self) -> dict[str, tuple[str, str, float]]:
        """Every held key: (owner, claimed_at, heartbeat_at)."""
        with self._lock:
            rows = self._conn.execute(f"SELECT * FROM {CLAIMS}").fetchall()
        return {r["key"]: (r["owner"], r["claimed_at"], r["heartbeat_at"]) for r in rows}

    def beat(self, owner: str) -> None:
        """The heartbeat: ``owner`` still runs what it holds."""
        with self._write() as db:
            db.execute(f"UPDATE {CLAIMS} SET heartbeat_at = ? WHERE owner = ?", (time.time(), owner))

    def release(self, owner: str, key: str | None = None) -> None:
        """Let go of ``key`` (default: everything ``owner`` holds); an unfinished trial's row stays ``running``."""
        with self._write() as db:
            db.execute(f"DELETE FROM {CLAIMS} WHERE owner = ?" + (" AND key = ?" if key else ""),
                       (owner, key) if key else (owner,))


def retry_locked(step, wait_s: float = 60.0):
    """``step()``, again while SQLite says the database is locked or busy: switching the journal mode needs
    the file to itself and SQLite does not wait for that (two processes opening a new store at once)."""
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not any(w in str(exc).lower() for w in ("locked", "busy")) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(0.5, delay * 2)
