"""Learning-rate sweep behind the methods' declared ``schedule_lr`` (plugins/), selected on VALIDATION accuracy.

For each point of the grid below, every method runs once (seed 0) on the default setup
(configs/default.yaml: MiniLM, movie_sentiment, its budget, 50 steps of 16) through
``peftbench run``; the table printed at the end gives each method's best-checkpoint
validation accuracy per learning rate (the test accuracy is shown for information only and
plays no part in the choice). Rerunning resumes: finished trials are skipped.

    python benchmarks/lr_sweep.py [--out /tmp/lr_sweep] [--threads 1] [--table-only]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: three values per method around the rates a 50-step schedule needs (low, middle, high)
GRID: dict[str, list[float]] = {
    "full": [5e-5, 1e-4, 2e-4],
    "head": [3e-3, 1e-2, 3e-2],
    "lora": [2e-3, 5e-3, 1e-2],
    "qlora": [2e-3, 5e-3, 1e-2],
    "adapter_lora": [2e-3, 5e-3, 1e-2],
    "houlsby": [1e-3, 3e-3, 1e-2],
    "pfeiffer": [3e-3, 1e-2, 3e-2],
    "ptuning_v2": [1e-2, 3e-2, 1e-1],
    # their MLP / encoder width is narrowed by the solver to fit the budget
    "prefix": [2e-3, 5e-3, 1.5e-2],
    "ptuning": [1e-3, 3e-3, 1e-2],
    "prompt": [1e-2, 3e-2, 1e-1],
}
CONFIG: dict[str, str] = {}  # per-method config overrides (none: the solver sizes every method)


def suite_yaml(index: int, out: Path, threads: int) -> str:
    lines = [f"include: {ROOT / 'configs' / 'default.yaml'}", f"suite: lr_{index}", f"out: {out}", "seeds: 1",
             "methods:"]
    for method, values in GRID.items():
        extra = f", config: {CONFIG[method]}" if method in CONFIG else ""
        lines.append(f"  - {{name: {method}, lr: {values[index]}{extra}}}")
    lines += ["training:", f"  threads: {threads}", "  save_weights: false"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lr_sweep"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true", help="print the table from the stores in --out, run nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    points = len(next(iter(GRID.values())))
    for i in range(0 if args.table_only else points):
        config = args.out / f"lr_{i}.yaml"
        config.write_text(suite_yaml(i, args.out, args.threads))
        subprocess.run([sys.executable, "-m", "peftbench", "run", "--config", str(config), "--quiet"], check=False)
    results: dict[str, dict[float, tuple]] = {}
    for i in range(points):
        store = args.out / f"lr_{i}" / "results.sqlite"
        if not store.is_file():
            continue
        with sqlite3.connect(store) as db:
            for method, status, lr, val, test in db.execute(
                    "select method, status, lr, val_metrics, metrics from trials"):
                acc = lambda text: (json.loads(text) or {}).get("accuracy") if text else None  # noqa: E731
                results.setdefault(method, {})[lr] = (status, acc(val), acc(test))
    print("| method | " + " | ".join(f"lr {k + 1}" for k in range(points)) + " | chosen (best validation) |")
    print("|---" * (points + 2) + "|")
    for method in GRID:
        cells, best = [], None
        for lr in GRID[method]:
            status, val, test = results.get(method, {}).get(lr, ("missing", None, None))
            cells.append(f"{lr:g}: val {val:.3f} (test {test:.3f})" if val is not None else f"{lr:g}: {status}")
            if val is not None and (best is None or val > best[1]):
                best = (lr, val)
        chosen = f"{best[0]:g}" if best else "—"
        print(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
