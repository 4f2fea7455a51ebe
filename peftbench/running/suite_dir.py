"""The suite folder ``<out>/<suite>``: ``suite.json`` (what the suite is, the commands that ran it),
``results.sqlite`` and the trials' artifacts. A folder holding another suite's results is
refused before anything in it changes."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.results.store import StoreError, check_store

SUITE_FILE = "suite.json"
STORE_FILE = "results.sqlite"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _diff(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


def unwritable(target: Path) -> tuple[str, Path] | None:
    """Why the folder ``target`` cannot be created or written: ``("file", path)`` when a path on the
    way is a file, ``("read-only", folder)`` when its nearest existing folder cannot be written; None
    when it can. The callers (``run``, ``report``) word the error."""
    for folder in (target, *target.parents):
        if folder.exists() and not folder.is_dir():
            return "file", folder
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return None if os.access(existing, os.W_OK | os.X_OK) else ("read-only", existing)


def check_writable(out: Path, suite_dir: Path) -> None:
    """Errors, before anything is written, for an ``--out`` that is a file or a folder this process cannot write."""
    blocked = unwritable(suite_dir)
    if blocked and blocked[0] == "file":
        folder = blocked[1]
        what = "--out" if folder == out else f"{folder} (on the way to {suite_dir})"
        raise ConfigError(f"{what} is a file, not a folder: {folder}; give --out a folder (it is created when missing)")
    if blocked:
        existing = blocked[1]
        raise ConfigError(f"{existing} is read-only, so the suite folder {suite_dir} cannot be written; nothing was "
                          f"changed; give --out a writable folder (or make this one writable)")
    if suite_dir.is_dir():
        for name in (SUITE_FILE, STORE_FILE):
            if (suite_dir / name).exists() and not os.access(suite_dir / name, os.W_OK):
                raise ConfigError(f"{suite_dir / name} is read-only; nothing was changed; give --out a writable "
                                  f"folder (or make the file writable)")


def check_suite_dir(plan, out: Path) -> dict | None:
    """The folder's ``suite.json`` (None when new); an error when it holds a different suite's results,
    a results store SQLite cannot read, or when the folder cannot be written."""
    suite_dir = out / plan.name
    info_path = suite_dir / SUITE_FILE
    advice = "choose another name with --suite NAME or another folder with --out DIR"
    check_writable(out, suite_dir)
    if (suite_dir / STORE_FILE).is_file():
        try:
            check_store(suite_dir / STORE_FILE)
        except StoreError as exc:
            raise ConfigError(str(exc)) from None
    if not info_path.is_file():
        if (suite_dir / STORE_FILE).exists():
            raise ConfigError(f"{suite_dir} holds a results store but no {SUITE_FILE}: it was not written by this "
                              f"suite; nothing was changed; {advice}")
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{info_path} is not valid JSON ({exc}); refusing to write into {suite_dir}") from None
    if info.get("hash") != plan.suite.hash():
        changes = _diff(info.get("config", {}), plan.suite.identity())
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes) - 8} more)" if len(changes) > 8 else "")
        raise ConfigError(
            f"{suite_dir} holds the results of a different suite (made by: {info.get('command', '?')}); "
            f"this run differs in {shown or 'its configuration'}. Nothing was changed; {advice}"
        )
    return info


def open_suite_dir(plan, command: str, out: Path) -> Path:
    """``<out>/<suite>``, refusing one that holds a different suite's results (nothing is touched then)."""
    suite_dir = out / plan.name
    info_path = suite_dir / SUITE_FILE
    info = check_suite_dir(plan, out)
    if info is None:
        info = {"suite": plan.name, "hash": plan.suite.hash(), "command": command, "created_at": _now(),
                "config": plan.suite.identity(), "runs": []}
    info.setdefault("runs", []).append({"command": command, "at": _now()})
    try:
        suite_dir.mkdir(parents=True, exist_ok=True)
        tmp = info_path.with_suffix(f".json.{os.getpid()}.tmp")  # runs starting together never share one
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.replace(info_path)
    except OSError as exc:
        raise ConfigError(f"cannot write {info_path}: {exc.strerror or exc}; give --out a writable folder") from None
    return suite_dir
