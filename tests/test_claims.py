"""Several processes on one suite: claims in the store, heartbeats, takeover of a dead claim.

Two ``peftbench run`` processes on one suite folder split its grid (and its search) without
training a trial twice and leave one report; a claim whose process is gone (``kill -9``) or
whose heartbeat stopped is taken over, a live one is not; only the holder records a result.
Trials run for real on test_runner's tiny random BERT and CSV task.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from peftbench.results.store import ClaimLost, Store, StoreError
from peftbench.running.claims import Claims
from test_runner import base_args, env  # noqa: F401 - env is a fixture
from test_store import RESULT, trial

TESTS = Path(__file__).parent
FAST = {"PEFTBENCH_HEARTBEAT_S": "0.5", "PEFTBENCH_STALE_S": "600"}  # a dead claim here is a dead pid, not a silence


def _env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **FAST, **extra}


def _start_run(argv: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """``peftbench run argv`` in a subprocess, its output in files (a pipe nobody reads would stall it)."""
    proc = subprocess.Popen([sys.executable, "-m", "peftbench.running.runner", *argv], cwd=cwd, env=_env(),
                            stdout=open(cwd / f"{name}.out", "w"), stderr=open(cwd / f"{name}.err", "w"))
    proc.logs = cwd / f"{name}.out", cwd / f"{name}.err"
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, *(path.read_text() for path in proc.logs)


def _records(db: Path):
    with Store(db, readonly=True) as store:
        return store.records()


def _claims(db: Path) -> dict:
    if not db.is_file():
        return {}
    try:
        with Store(db, readonly=True) as store:
            return {k: v for k, v in store.claims().items() if not k.startswith("run:")}
    except Exception:  # noqa: BLE001 - the store is being created
        return {}


def _trained(out: str) -> Counter:
    """The trials a process printed a finished-trial line for (one line per trial it ran): label, #index."""
    return Counter(m.group(1) + (m.group(2) or "")
                   for m in re.finditer(r"^(.+?)(?: (#\d+) [^:\n]*)?: (?:validation )?accuracy ", out, re.M))


def _summary(out: str) -> dict[str, int]:
    line = next(line for line in out.splitlines() if line.startswith("suite "))
    return {k: int(n) for n, k in re.findall(r"(\d+) ([a-z ]+?)(?:,|;)", line)}


# -- the store and the claims, between real processes -----------------------------------------
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from peftbench.results.store import ClaimLost, Store, StoreError
from peftbench.running.claims import Claims
from test_store import RESULT, trial
with Store({db!r}) as store, Claims(store) as claims:
    print(claims.claim(trial(0)), flush=True)
    if sys.stdin.readline().strip() == "silence":  # alive but silent, as a frozen process (not SIGSTOP: a stop
        claims._stop.set()                          # inside a heartbeat's write would hold the store's lock)
        claims._thread.join()
        print("silent", flush=True)
        sys.stdin.readline()  # the parent says when to finish
    try:
        store.finish(trial(0).trial_id, RESULT, owner=claims.owner)
        print("finished", flush=True)
    except ClaimLost as exc:
        print("lost:", exc, flush=True)
"""


def _child(db: Path, **extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), db=str(db))], env=_env(**extra),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed", proc.stderr.read()
    return proc


def test_a_live_claim_is_left_alone_a_silent_one_is_taken_over_and_its_holder_cannot_record(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("PEFTBENCH_STALE_S", "2")
    db = tmp_path / "results.sqlite"
    Store(db).close()
    child = _child(db, PEFTBENCH_HEARTBEAT_S="0.2", PEFTBENCH_STALE_S="2")
    try:
        with Store(db) as store, Claims(store) as claims:
            time.sleep(3)  # longer than the stale limit: the child's heartbeat keeps its claim alive
            assert claims.claim(trial(0)) == "held"
            assert store.get(trial(0).trial_id).attempts == 1
            with pytest.raises(ClaimLost, match="taken over"):  # only the holder records a result
                store.finish(trial(0).trial_id, RESULT, owner=claims.owner)
            child.stdin.write("silence\n")  # alive, but silent: its heartbeat stops
            child.stdin.flush()
            assert child.stdout.readline().strip() == "silent"
            time.sleep(3)
            assert claims.claim(trial(0)) == "claimed"
            row = store.get(trial(0).trial_id)
            assert row.status == "running" and row.attempts == 2
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().startswith("lost: trial")  # its late result is not kept
            store.finish(trial(0).trial_id, RESULT, owner=claims.owner)
            assert store.get(trial(0).trial_id).status == "done" and trial(0).trial_id not in store.claims()
            assert claims.claim(trial(0)) == "finished"
    finally:
        child.kill()
        child.wait()


def test_a_claim_whose_process_died_on_this_machine_is_taken_over_at_once(tmp_path, monkeypatch):
    """In the rollback-journal mode too (PEFTBENCH_STORE_JOURNAL=delete: processes on several machines)."""
    monkeypatch.setenv("PEFTBENCH_STALE_S", "600")
    db = tmp_path / "results.sqlite"
    with monkeypatch.context() as m:
        m.setenv("PEFTBENCH_STORE_JOURNAL", "delete")
        Store(db).close()
    child = _child(db)  # started without the variable: it keeps the store's mode
    with Store(db) as store, Claims(store) as claims:
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert claims.claim(trial(0)) == "held"
        child.kill()  # kill -9: its heartbeat is fresh, but its pid is gone
        child.wait()
        assert claims.claim(trial(0)) == "claimed" and store.get(trial(0).trial_id).attempts == 2
    with Store(db) as store, Claims(store) as later:  # the killed process's run is forgotten, the others' ended
        assert store.claims().keys() == {"run:" + later.owner}
    monkeypatch.setenv("PEFTBENCH_STORE_JOURNAL", "memory")
    with pytest.raises(StoreError, match="PEFTBENCH_STORE_JOURNAL='memory' is not one of wal, delete"):
        Store(db)


def test_a_trial_that_failed_in_this_run_is_not_retried_by_a_process_that_joins_it(tmp_path):
    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        with Claims(store) as first:
            assert first.claim(trial(0)) == "claimed"
            store.fail(trial(0).trial_id, "failed", "boom", owner=first.owner)
            time.sleep(1.1)
            with Claims(store) as joined:  # joins the running process: its failures count as tried
                assert joined.since == first.since
                assert joined.claim(trial(0)) == "tried"
        time.sleep(1.1)
        with Claims(store) as rerun:  # a later run retries it
            assert rerun.since > first.since
            assert rerun.claim(trial(0)) == "claimed" and store.get(trial(0).trial_id).attempts == 2


# -- whole runs -----------------------------------------------------------------------------------
GRID = ("--methods", "head,lora", "--budget", "5%", "--seeds", "2", "--max-steps", "4")


def test_two_runs_of_one_suite_split_the_grid_train_each_trial_once_and_leave_one_report(env, tmp_path):
    out = tmp_path / "reports"
    argv = [a for a in base_args(env, out, *GRID, "--suite", "shared") if a != "--quiet"]
    procs = [_start_run(argv, tmp_path, f"run{i}") for i in range(2)]
    results = [_finish(p) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    records = _records(out / "shared" / "results.sqlite")
    assert len(records) == 4 and all(r.status == "done" and r.attempts == 1 for r in records)
    trained = sum((_trained(o) for _, o, _ in results), Counter())
    assert trained == Counter({r.spec.label: 1 for r in records}), trained  # one training per trial, over both processes
    summaries = [_summary(o) for _, o, _ in results]
    assert sum(s.get("done", 0) for s in summaries) == 4
    assert all(s.get("done", 0) + s.get("by others", 0) == 4 for s in summaries)
    suite = out / "shared"
    assert (suite / "report.md").is_file() and not list(suite.glob("*.tmp"))
    for r in records:  # each trial's folder holds one training's log: steps 1..4 once each
        log = [json.loads(line) for line in (suite / "trials" / r.trial_id / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log if "loss" in e] == list(range(1, 5))
    assert _claims(suite / "results.sqlite") == {}  # both let go of everything


def test_a_run_waits_for_a_trial_another_process_holds_and_takes_it_over_when_that_process_dies(env, tmp_path):
    out = tmp_path / "reports"
    argv = [a for a in base_args(env, out, *GRID, "--suite", "taken") if a != "--quiet"]
    db = out / "taken" / "results.sqlite"
    first = _start_run(argv, tmp_path, "first")
    try:
        deadline = time.time() + 300
        while not (held := _claims(db)) and time.time() < deadline:
            assert first.poll() is None, first.logs[1].read_text()[-2000:]
            time.sleep(0.05)
        assert held, "the first run never claimed a trial"
        os.kill(first.pid, signal.SIGSTOP)  # it holds one trial, alive but frozen
        [(taken, (owner, _, _))] = held.items()
        assert owner.split(":")[1] == str(first.pid)
        second = _start_run(argv, tmp_path, "second")
        while "waiting for 1 trial(s)" not in second.logs[1].read_text():
            assert second.poll() is None, "the second run ended without waiting: " + second.logs[1].read_text()[-2000:]
            time.sleep(0.1)
        statuses = {r.trial_id: r.status for r in _records(db)}
        assert statuses.pop(taken) == "running" and list(statuses.values()) == ["done"] * 3
    finally:
        first.kill()  # kill -9 while frozen
        first.wait()
    rc, output, err = _finish(second)
    assert rc == 0, err[-2000:]
    records = {r.trial_id: r for r in _records(db)}
    assert all(r.status == "done" for r in records.values()) and records[taken].attempts == 2
    assert all(r.attempts == 1 for t, r in records.items() if t != taken)
    assert _summary(output)["done"] == 4 and (out / "taken" / "report.md").is_file()


SEARCH = ("--methods", "lora", "--budget", "5%,10%", "--seeds", "1", "--search-trials", "2", "--max-steps", "8",
          "--train-limit", "64", "--eval-limit", "32", "--test-limit", "32", "--eval-every", "4")


def test_two_runs_of_one_search_ask_each_index_once_and_train_no_trial_twice(env, tmp_path):
    out = tmp_path / "reports"
    argv = [a for a in base_args(env, out, *SEARCH, "--suite", "searched") if a != "--quiet"]
    results = [_finish(p) for p in [_start_run(argv, tmp_path, f"run{i}") for i in range(2)]]
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    records = _records(out / "searched" / "results.sqlite")
    search = [r for r in records if r.spec.role == "search"]
    finals = [r for r in records if r.spec.role == "final"]
    assert len(search) == 4 and len(finals) == 2 and all(r.status == "done" and r.attempts == 1 for r in records)
    assert Counter((r.spec.budget, r.spec.search_index) for r in search) == Counter(
        {(b, i): 1 for b in ("5%", "10%") for i in (0, 1)})
    trained = sum((_trained(o) for _, o, _ in results), Counter())
    assert all(n == 1 for n in trained.values()) and sum(trained.values()) == 6
    assert (out / "searched" / "report.md").is_file()
