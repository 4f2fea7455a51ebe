"""Where task data comes from: packaged files, local files, the hub, the GLUE/SuperGLUE table.

Each source returns a ``Task`` whose builder gives raw train/validation/test splits; the
checks and label encoding are ``tasks.prepare``'s. Missing splits are carved from train,
10% each, stratified by label, by a fixed ``split_seed`` (not the training seed: every seed
of a comparison must see the same test set).
"""

from __future__ import annotations

import gzip
import json
from functools import partial
from importlib import resources
from pathlib import Path

from peftbench.errors import AssetError, ConfigError
from peftbench.tasks.checks import check_carved, check_label_values, check_rows
from peftbench.tasks.task import CARVED, SPLITS, Task, column, quiet_datasets

EVAL_FRACTION = 0.1
VALIDATION_ALIASES = ("validation", "valid", "dev", "val")
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
COLUMN_OPTIONS = ("text_column", "text_columns", "label_column", "kind", "metrics", "primary_metric",
                  "direction", "labels", "split_seed", "name", "drop_invalid")


# -- packaged ----------------------------------------------------------------------------
def read_packaged(name: str):
    """``peftbench/data/<name>.jsonl.gz``: a ``_meta`` line, then rows with a ``split`` field."""
    import datasets

    path = resources.files("peftbench") / "data" / f"{name}.jsonl.gz"
    if not path.is_file():
        raise AssetError(f"packaged task data {name}.jsonl.gz is missing from the peftbench install; "
                         "reinstall peftbench (pip install --force-reinstall peftbench)")
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            if "_meta" not in row:
                rows[row.pop("split")].append(row)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()})


def packaged_meta(name: str) -> dict:
    """The ``_meta`` record of a packaged task file (source, sha256, licence, counts)."""
    path = resources.files("peftbench") / "data" / f"{name}.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return json.loads(lines.readline())["_meta"]


# -- carving missing splits ----------------------------------------------------------------
def rows_per_label(splits: int) -> int:
    """The fewest rows a label needs so that each of ``splits`` carved splits gets one and train keeps one."""
    m = 1
    while round(EVAL_FRACTION * m) < 1 or m - splits * round(EVAL_FRACTION * m) < 1:
        m += 1
    return m


def carve(ds, names: tuple[str, ...], label_column: str | None, seed: int, where: str = "the data",
          source: str = "the train split") -> dict:
    """Split ``ds`` into ("train", *names): EVAL_FRACTION of each label group per name.

    A label column that cannot be classes (one class, continuous values) and a table too small
    to give every split a row are errors naming the counts (``where`` names the task, ``source``
    what ``ds`` is)."""
    import numpy as np

    groups: dict[str, list[int]] = {}
    keys = column(ds, label_column) if label_column else [None] * len(ds)
    if label_column:
        check_label_values(where, label_column, keys)
    for i, key in enumerate(keys):
        groups.setdefault(str(key), []).append(i)
    rng = np.random.default_rng(seed)
    picked: dict[str, list[int]] = {name: [] for name in ("train", *names)}
    for key in sorted(groups):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        n = round(EVAL_FRACTION * len(members))
        for k, name in enumerate(names):
            picked[name] += members[k * n:(k + 1) * n]
        picked["train"] += members[len(names) * n:]
    check_carved(where, source, len(ds), {name: len(idx) for name, idx in picked.items()},
                 len(groups) if label_column else None, rows_per_label(len(names)))
    with quiet_datasets():
        parts = {name: ds.select(sorted(idx)).flatten_indices() for name, idx in picked.items()}
    for name in names:  # the split says where it came from (the report names which split selected what)
        parts[name].info.description = (f"{CARVED} ({EVAL_FRACTION:.0%} of each "
                                        f"{'label' if label_column else 'row set'}, split seed {seed})")
    return parts


# -- options shared by file: and hub: ------------------------------------------------------
def _columns(spec: str, options: dict, extra: tuple[str, ...]) -> dict:
    bad = sorted(set(options) - set(COLUMN_OPTIONS) - set(extra))
    if bad:
        raise ConfigError(f"task {spec!r}: unknown option(s) {bad}; allowed: {', '.join(sorted((*COLUMN_OPTIONS, *extra)))}")
    kind = options.get("kind", "classification")
    text = options.get("text_columns", options.get("text_column", "source" if kind == "generation" else "text"))
    if isinstance(text, str):
        text = tuple(c.strip() for c in text.split(",") if c.strip())
    label = options.get("label_column", "target" if kind == "generation" else "label")
    fields = dict(name=options.get("name", spec), kind=kind, text_columns=tuple(text), label_column=label,
                  drop_invalid=bool(options.get("drop_invalid", False)))
    for key in ("metrics", "primary_metric", "direction", "labels"):
        if key in options:
            value = options[key]
            fields[key] = tuple(value.split(",")) if key in ("metrics", "labels") and isinstance(value, str) else value
    return fields


# -- local files ---------------------------------------------------------------------------
def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except Exception as exc:
        raise ConfigError(f"could not read {str(path)!r} as {suffix[1:]}: {type(exc).__name__}: {exc}") from exc


def _given(data):
    return data


def file_task(path: str, **options) -> Task:
    """A local table; a ``split`` column (train/validation/test) is used when present."""
    import datasets

    spec = f"file:{path}"
    fields = _columns(spec, options, ("split_column",))
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"task {spec!r}: no such file {str(file)!r}")
    if file.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"task {spec!r}: unsupported file type {file.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    table = _read_table(file)
    split_column = options.get("split_column", "split")
    label_for_strata = fields["label_column"] if fields["kind"] == "classification" else None
    if label_for_strata and label_for_strata not in table.columns:
        label_for_strata = None  # prepare() names the missing column
    seed = int(options.get("split_seed", 0))
    where = f"task {spec!r}"
    checked = {c: table[c].tolist() for c in (*fields["text_columns"], fields["label_column"]) if c in table.columns}
    keep, dropped = check_rows(where, checked, label_for_strata, fields["drop_invalid"],
                               unit="line" if file.suffix.lower() == ".jsonl" else "row")
    if dropped:
        table = table.iloc[keep].reset_index(drop=True)

    if split_column in table.columns:
        parts = {}
        for value, rows in table.groupby(split_column, sort=False):
            name = "validation" if str(value).lower() in VALIDATION_ALIASES else str(value).lower()
            if name not in SPLITS:
                raise ConfigError(f"task {spec!r}: split column {split_column!r} holds {value!r}; "
                                  "allowed: train, validation (or dev/valid/val), test")
            parts[name] = datasets.Dataset.from_pandas(rows.drop(columns=[split_column]), preserve_index=False)
        if "train" not in parts:
            raise ConfigError(f"task {spec!r}: the train split is empty (split column {split_column!r})")
        missing = tuple(s for s in ("validation", "test") if s not in parts)
        if missing:
            parts.update(carve(parts["train"], missing, label_for_strata, seed, where))
    else:
        whole = datasets.Dataset.from_pandas(table, preserve_index=False)
        parts = carve(whole, ("validation", "test"), label_for_strata, seed, where, "the file")
    data = datasets.DatasetDict(parts)
    task = Task(builder=partial(_given, data), description=f"local file {file}", **fields)
    task.warnings += [dropped] if dropped else []
    task.load()  # a local file is cheap: check columns and labels now, where the user asked for it
    return task


# -- the hub -------------------------------------------------------------------------------
def _hub_load(spec: str, name: str, config: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as exc:
        where = f"{name!r}" + (f", {config!r}" if config else "")
        raise ConfigError(
            f"task {spec!r} loads from the Hugging Face hub (datasets.load_dataset({where})) and that failed: "
            f"{type(exc).__name__}: {exc}. It needs network access to the hub (or a filled datasets cache); "
            "offline, use a bundled task (movie_sentiment, rotten_tomatoes, trec, sms_spam, e2e_nlg) "
            "or file:PATH"
        ) from exc


def _unlabelled(ds, label_column: str | None) -> bool:
    if not label_column or label_column not in ds.column_names:
        return False
    return all(v is None or v == -1 for v in ds[label_column][:1000])


def hub_splits(spec: str, name: str, config: str | None, label_column: str | None, seed: int,
               validation: str | None = None):
    """train/validation/test from the hub; hidden test labels -> the official dev set is test."""
    import datasets

    found = _hub_load(spec, name, config)
    if "train" not in found:
        raise ConfigError(f"task {spec!r}: the dataset has no train split; it has {sorted(found)}")
    dev = validation or next((s for s in VALIDATION_ALIASES if s in found), None)
    test = found["test"] if "test" in found and not _unlabelled(found["test"], label_column) else None
    if test is None and dev is not None:  # GLUE-style: labelled dev becomes test, validation comes from train
        test, dev = found[dev], None
    parts = {"train": found["train"]}
    if dev is not None:
        parts["validation"] = found[dev]
    if test is not None:
        parts["test"] = test
    missing = tuple(s for s in ("validation", "test") if s not in parts)
    if missing:
        parts.update(carve(parts["train"], missing, label_column, seed, f"task {spec!r}"))
    return datasets.DatasetDict(parts)


def hub_task(name: str, **options) -> Task:
    spec = f"hub:{name}"
    fields = _columns(spec, options, ("config",))
    if not name.strip():
        raise ConfigError("task 'hub:': give a dataset name, e.g. hub:owner/name")
    label = fields["label_column"] if fields["kind"] == "classification" else None
    seed = int(options.get("split_seed", 0))
    return Task(builder=partial(hub_splits, spec, name, options.get("config"), label, seed),
                description=f"hub dataset {name}", **fields)


# -- GLUE / SuperGLUE ----------------------------------------------------------------------
# name: (hub id, config, text columns, labels, metrics, dev split). Test labels are hidden on
# the hub, so the official dev set is our test set and validation is carved from train.
BENCHMARKS = {
    "glue/cola": ("nyu-mll/glue", "cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy"), None),
    "glue/sst2": ("nyu-mll/glue", "sst2", ("sentence",), ("negative", "positive"), ("accuracy",), None),
    "glue/mrpc": ("nyu-mll/glue", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                  ("accuracy", "macro_f1"), None),
    "glue/qqp": ("nyu-mll/glue", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("accuracy", "macro_f1"), None),
    "glue/mnli": ("nyu-mll/glue", "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                  ("accuracy",), "validation_matched"),
    "glue/qnli": ("nyu-mll/glue", "qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), None),
    "glue/rte": ("nyu-mll/glue", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), None),
    "glue/wnli": ("nyu-mll/glue", "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), None),
    "super_glue/boolq": ("aps/super_glue", "boolq", ("question", "passage"), ("False", "True"), ("accuracy",), None),
    "super_glue/cb": ("aps/super_glue", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
                      ("accuracy", "macro_f1"), None),
    "super_glue/rte": ("aps/super_glue", "rte", ("premise", "hypothesis"), ("entailment", "not_entailment"),
                       ("accuracy",), None),
}
UNSUPPORTED = {
    "glue/stsb": "a regression task (similarity scores), and peftbench tasks are classification or generation",
    "glue/ax": "a test-only diagnostic set without training data",
    "super_glue/axb": "a test-only diagnostic set without training data",
    "super_glue/axg": "a test-only diagnostic set without training data",
    "super_glue/copa": "multiple choice, not single-text or pair classification",
    "super_glue/multirc": "multi-answer reading comprehension, not pair classification",
    "super_glue/record": "cloze-style reading comprehension, not pair classification",
    "super_glue/wic": "a pair task that also needs the target word; not in the table",
    "super_glue/wsc": "coreference with span indices; not in the table",
}


def benchmark_task(spec: str) -> Task:
    hub_id, config, text, labels, metrics, dev = BENCHMARKS[spec]
    return Task(name=spec, kind="classification", text_columns=text, label_column="label", labels=labels,
                metrics=metrics, description=f"{spec} from the hub ({hub_id}, {config}); test = official dev set",
                builder=partial(hub_splits, spec, hub_id, config, "label", 0, validation=dev))


def refuse_unsupported(spec: str) -> None:
    if spec in UNSUPPORTED:
        raise ConfigError(f"task {spec!r} is not supported: {UNSUPPORTED[spec]}; supported benchmark tasks: "
                          f"{', '.join(BENCHMARKS)}; or use hub:NAME with --text-column/--label-column")
