"""Two-stage training measured (issue #14; design note 003 §4.1): does an adapter trained on related data
help a low-resource task?

    python benchmarks/two_stage.py            # resumable: rerun to continue; prints the table at the end
    python benchmarks/two_stage.py --table    # only the table, from the stores

Stage 1 (configs/two-stage-source.yaml): Houlsby and LoRA at 1% on movie-review sentiment, 3 seeds.
Its data is movie_sentiment without every sentence that rotten_tomatoes uses for validation or test
(written here to reports/two-stage-data/): both corpora come from the Pang & Lee snippets and share
many sentences, so without this filter stage 1 would train on the target's evaluation sentences.
Stage 2 (configs/two-stage.yaml): rotten_tomatoes with 64 and with 256 training examples, each method
from scratch and from its stage-1 adapter of the same seed, same lr and schedule. The table gives test
accuracy per arm (mean [95% CI] over seeds) and the difference init − scratch in points with its 95%
Welch interval and relative to scratch. This script names built-in methods, so it lives in benchmarks/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT / "peftbench" / "data"
OUT = ROOT / "reports"
SOURCE_FILE = OUT / "two-stage-data" / "movie_sentiment_minus_rt_eval.jsonl"
#: (suite, extra flags) of stage 2
TARGETS = [("two-stage-64", []),
           ("two-stage-256", ["--train-limit", "256", "--epochs", "10", "--eval-every", "16", "--suite",
                              "two-stage-256"])]


def _rows(name: str) -> list[dict]:
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][1:]  # line 1 is the _meta record


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def write_source_data() -> dict:
    """movie_sentiment's rows (with their split) minus rotten_tomatoes' validation and test sentences."""
    held_out = {_norm(r["text"]) for r in _rows("rotten_tomatoes") if r["split"] in ("validation", "test")}
    movie = _rows("movie_sentiment")
    kept = [{"text": r["text"], "label": r["label"], "split": r["split"]} for r in movie
            if _norm(r["text"]) not in held_out]
    SOURCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    if not SOURCE_FILE.is_file() or SOURCE_FILE.read_text(encoding="utf-8") != text:
        SOURCE_FILE.write_text(text, encoding="utf-8")
    return {"movie_rows": len(movie), "removed": len(movie) - len(kept), "held_out": len(held_out)}


def run(argv: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "peftbench", "run", *argv], cwd=ROOT, check=True)


def table() -> str:
    from evidence import Row, diff  # benchmarks/evidence.py: the same Welch interval as the evidence table
    from peftbench.report import stats
    from peftbench.results.store import Store

    lines = ["| train examples | method | from scratch | from the stage-1 adapter | init − scratch (points) "
             "| relative |", "| --- | --- | --- | --- | --- | --- |"]
    for suite, _ in TARGETS:
        path = OUT / suite / "results.sqlite"
        if not path.is_file():
            continue
        with Store(path, create=False) as store:
            records = [r for r in store.records() if r.done and r.spec.role == "final"]
        size = records[0].spec.training.train_limit if records else "?"
        for method in ("houlsby", "lora"):
            arms = {}
            for r in records:
                if r.spec.method == method:
                    arms.setdefault(bool(r.spec.init_from), []).append(100 * r.result.metrics["accuracy"])
            scratch, init = arms.get(False, []), arms.get(True, [])
            if len(scratch) < 2 or len(init) < 2:
                continue
            d, interval, p = diff(Row("init", init, 0.0), Row("scratch", scratch, 0.0))

            def arm(values):
                ci = stats.ci(values)
                return f"{stats.mean(values):.1f} [{ci[0]:.1f}, {ci[1]:.1f}] (n={len(values)})"

            lines.append(f"| {size} | {method} | {arm(scratch)} | {arm(init)} | {d:+.1f} [{interval[0]:+.1f}, "
                         f"{interval[1]:+.1f}], Welch p={p:.2g} | {100 * d / stats.mean(scratch):+.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="only print the table from the stores")
    args = ap.parse_args(argv)
    if not args.table:
        counts = write_source_data()
        print(f"stage-1 data: {counts['movie_rows']} movie_sentiment rows, {counts['removed']} removed (their text "
              f"is one of rotten_tomatoes' {counts['held_out']} validation/test sentences) -> {SOURCE_FILE}")
        run(["--config", "configs/two-stage-source.yaml"])
        for suite, extra in TARGETS:
            run(["--config", "configs/two-stage.yaml", *extra])
    text = table()
    print(text)
    (OUT / "two-stage-64").mkdir(parents=True, exist_ok=True)
    (OUT / "two-stage-64" / "two-stage.md").write_text("# Two-stage training: rotten_tomatoes from scratch vs from a "
                                                       "movie-sentiment adapter\n\nWritten by `python "
                                                       "benchmarks/two_stage.py`.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
