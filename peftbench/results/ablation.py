"""Stored layer-ablation results (``ablation.json`` in a suite folder), written by ``peftbench ablate``
and read by the report, which draws its heatmaps from them without recomputing anything.

The file is ``{"format": 1, "trials": {trial_id: entry}, "not_per_layer": {trial_id: entry}}``; an entry holds the trial's task, backbone,
budget, method (``display``: with its variant), seed, primary metric and its direction, the backbone's
layer count, the layers the method added something to, the validation examples, the metric with every
layer on (``baseline``) and with each span of layers off (``spans``: ``"first-last"`` -> metric), and a
``fingerprint`` of the adapter weights and the validation subsample it was measured on. Trials whose method
added nothing to the layers (a soft prompt, the head alone) are kept under ``not_per_layer`` (identity
and fingerprint only), so a rerun does not load them again.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from peftbench.errors import ConfigError

ABLATION_FILE = "ablation.json"
ABLATION_FORMAT = 1


def spans(layers: int) -> list[tuple[int, int]]:
    """Every contiguous span ``(first, last)`` of ``layers`` layers: L·(L+1)/2 of them."""
    return [(i, j) for i in range(layers) for j in range(i, layers)]


def span_key(first: int, last: int) -> str:
    return f"{first}-{last}"


def drop(baseline: float, ablated: float, direction: str) -> float:
    """How much worse the metric got with the span off (positive: worse), whichever way the metric points."""
    return baseline - ablated if direction == "max" else ablated - baseline


def read_ablation(suite_dir: str | Path) -> dict:
    """``ablation.json`` of a suite folder (``{"format": 1, "trials": {}}`` when there is none)."""
    path = Path(suite_dir) / ABLATION_FILE
    if not path.is_file():
        return {"format": ABLATION_FORMAT, "trials": {}, "not_per_layer": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as ablation results ({exc}); delete it and rerun peftbench ablate")
    if not isinstance(data, dict) or data.get("format") != ABLATION_FORMAT or not isinstance(data.get("trials"), dict):
        raise ConfigError(f"{path} is not ablation results of format {ABLATION_FORMAT}; delete it and rerun "
                          f"peftbench ablate")
    data.setdefault("not_per_layer", {})
    return data


def write_ablation(suite_dir: str | Path, data: dict) -> Path:
    """Write ``ablation.json`` whole (a reader never sees half of it; an interrupted run keeps what it wrote)."""
    path = Path(suite_dir) / ABLATION_FILE
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def mean_drops(entries: list[dict]) -> dict[str, float]:
    """Span -> the drop of the metric averaged over the entries (seeds), each against its own baseline."""
    found: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        for key, value in e["spans"].items():
            found[key].append(drop(e["baseline"], value, e["direction"]))
    return {key: sum(v) / len(v) for key, v in found.items()}


def by_group(data: dict, trial_ids: set[str] | None = None) -> dict[tuple, dict[str, list[dict]]]:
    """(task, backbone, budget) -> method (display) -> its entries, seeds in order; ``trial_ids``: only those."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for trial_id, e in sorted(data["trials"].items(), key=lambda kv: (kv[1]["display"], kv[1]["seed"])):
        if trial_ids is None or trial_id in trial_ids:
            groups[(e["task"], e["backbone"], e["budget"])][e["display"]].append(e)
    return {k: dict(v) for k, v in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))}
