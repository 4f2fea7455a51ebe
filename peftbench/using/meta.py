"""What a saved adapter says about itself (``adapter_config.json``), read and checked: its format
version, its method, and the task facts loading needs (labels, kind, max_length)."""

from __future__ import annotations

import json
from pathlib import Path

from peftbench.contract.injection import ADAPTER_FORMAT_VERSION, CONFIG_FILE
from peftbench.errors import ConfigError
from peftbench.using.locate import Located


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object: not {what}")
    return data


def adapter_meta(adapter: Path) -> dict:
    """The adapter's ``adapter_config.json``, its format version checked."""
    meta = read_json(adapter / CONFIG_FILE, "a peftbench adapter config")
    if "peft_type" in meta:
        raise ConfigError(f"{adapter} is a peft adapter, not a peftbench one: load it with peft, or load the folder "
                          f"it was exported to")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= ADAPTER_FORMAT_VERSION:
        raise ConfigError(f"{adapter / CONFIG_FILE}: format_version {version!r} is unknown; this peftbench reads "
                          f"adapter versions 0..{ADAPTER_FORMAT_VERSION}")
    for key in ("method", "config", "backbone"):
        if key not in meta:
            raise ConfigError(f"{adapter / CONFIG_FILE} has no {key!r}: not a peftbench adapter")
    return meta


def task_facts(meta: dict, found: Located, registry, notes: list[str]) -> dict:
    """Labels, kind, max_length: recorded by the adapter (format 1), else read from the suite's task."""
    if meta.get("format_version", 0) >= 1:
        return {"labels": tuple(meta.get("labels", ())), "kind": meta.get("task_kind", "classification"),
                "max_length": int(meta.get("max_length", 128))}
    if found.spec is None:
        raise ConfigError(f"{found.path} was saved before adapters recorded their label names (format 0): load it "
                          f"through its suite folder, whose store names the task")
    from peftbench.tasks.data import raw_data, task_for

    task = task_for(found.spec.task, registry)
    raw_data(task, found.spec.task, found.spec.training)  # loading fixes the label names
    notes.append(f"{found.path}: saved before adapters recorded label names and the backbone's hash (format 0); "
                 f"labels read from task {task.name!r}, backbone not checked")
    return {"labels": tuple(task.labels), "kind": task.kind, "max_length": found.spec.training.max_length}


def check_method(meta: dict, folder: Path, registry) -> None:
    """Refuse an adapter whose method is not installed, naming it."""
    try:
        registry.method(meta["method"])
    except ConfigError as exc:
        raise ConfigError(f"{folder} was saved by method {meta['method']!r}, which is not installed here "
                          f"({exc})") from None
