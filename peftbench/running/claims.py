"""Several ``peftbench run`` processes on one suite folder: who runs which trial.

Each process is one ``owner`` (``host:pid:token``). It claims a trial in the store right
before running it (``Store.claim``: one transaction, so two processes never both get it),
and a background thread refreshes the heartbeat of everything it holds every
``PEFTBENCH_HEARTBEAT_S`` seconds (default 10). A claim is dead, and taken over by the next
process that asks, when its heartbeat is older than ``PEFTBENCH_STALE_S`` seconds (default
60), or at once when its owner ran on this machine and that process is gone (``kill -9``).
A process that runs out of trials to claim waits (``wait``) for those that others hold, so
the last to finish sees the whole grid.

Processes that join while another one runs adopt its start time as ``since``: a trial that
failed after it was tried by this group of processes, not again (a rerun retries it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from peftbench.errors import ConfigError
from peftbench.results.leases import now
from peftbench.results.records import TrialSpec
from peftbench.results.store import Store

HEARTBEAT_S = 10.0
STALE_S = 60.0
RUN_PREFIX = "run:"  # the lease each process holds while it runs, claimed_at = its ``since``


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds above 0")
    return value


def _machine() -> str:
    """This machine and process namespace: a pid means the same process only where this matches."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot" in path else os.readlink(path))
        except OSError:
            pass
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(owner: str) -> str:
    """``host pid N`` for an owner string."""
    host, pid, _ = owner.rsplit(":", 2)
    return f"{host} pid {pid}"


class Claims:
    """This process's claims on one store: its owner name, its heartbeat thread, and whether the
    others' still live. Use as a context manager: everything it holds is released on exit."""

    def __init__(self, store: Store):
        self.store = store
        self.heartbeat_s = _setting("PEFTBENCH_HEARTBEAT_S", HEARTBEAT_S)
        self.stale_s = _setting("PEFTBENCH_STALE_S", STALE_S)
        if self.stale_s <= 2 * self.heartbeat_s:
            raise ConfigError(f"PEFTBENCH_STALE_S ({self.stale_s:g}) must be more than twice PEFTBENCH_HEARTBEAT_S "
                              f"({self.heartbeat_s:g}): a live process would look dead between two heartbeats")
        self.machine = _machine()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{self.machine}.{secrets.token_hex(4)}"
        self.since = now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said = ""

    # -- liveness ------------------------------------------------------------------------------
    def live(self, owner: str, heartbeat_at: float) -> bool:
        """Does ``owner`` still run what it holds? Not when its heartbeat is stale, nor when it ran on
        this machine and its process is gone."""
        if time.time() - heartbeat_at > self.stale_s:
            return False
        try:
            _, pid, token = owner.rsplit(":", 2)
            same_machine = token.split(".")[0] == self.machine
            return _alive(int(pid)) if same_machine else True
        except ValueError:
            return True

    # -- claiming -------------------------------------------------------------------------------
    def claim(self, spec: TrialSpec) -> str:
        """``claimed`` (this process runs it now), ``finished``, ``tried`` (failed since ``since``) or ``held``."""
        return self.store.claim(spec, self.owner, self.live, self.since)

    def lease(self, key: str) -> bool:
        return self.store.lease(key, self.owner, self.live)

    def exclusively(self, key: str, work: Callable[[], object]):
        """``work()`` while holding the lease ``key`` (waiting for another process that holds it)."""
        while not self.lease(key):
            time.sleep(min(1.0, self.heartbeat_s))
        try:
            return work()
        finally:
            self.store.release(self.owner, key)

    def wait(self, specs: list[TrialSpec], say: Callable[[str], None]) -> None:
        """Sleep one heartbeat while other processes run ``specs``; say so when what is waited for changes."""
        held = self.store.claims()
        who = sorted({describe(held[s.trial_id][0]) for s in specs if s.trial_id in held})
        shown = ", ".join(s.label for s in specs[:3]) + (f" and {len(specs) - 3} more" if len(specs) > 3 else "")
        line = (f"peftbench: waiting for {len(specs)} trial(s) that another process runs on this suite "
                f"({shown}; held by {', '.join(who) or 'a process that just let go'}); a claim whose heartbeat "
                f"is older than {self.stale_s:g} s is taken over")
        if line != self._said:
            say(line)
            self._said = line
        time.sleep(self.heartbeat_s)

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> "Claims":
        earlier = []
        for key, (owner, claimed_at, beat) in self.store.claims().items():
            if key.startswith(RUN_PREFIX) and self.live(owner, beat):
                earlier.append(claimed_at)
            elif key.startswith(RUN_PREFIX):  # a run that was killed: its lease goes
                self.store.release(owner, key)
        self.since = min([self.since, *earlier])  # joining a run: its failures are not retried by this group
        self.store.lease(RUN_PREFIX + self.owner, self.owner, self.live, claimed_at=self.since)
        self._thread = threading.Thread(target=self._beat, name="peftbench-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.store.beat(self.owner)
            except Exception as exc:  # noqa: BLE001 - a busy or vanished store: try again next beat
                print(f"peftbench: warning: heartbeat not written ({type(exc).__name__}: {exc})", file=sys.stderr)

    def __exit__(self, kind, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.store.release(self.owner)  # an unfinished trial's row stays 'running': the next process reruns it
        except Exception:  # noqa: BLE001 - the claims go stale on their own; the error in flight matters more
            if kind is None:
                raise
