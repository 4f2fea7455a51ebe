"""The Task contract: what a benchmark task is and how it loads (``tasks.resolve`` names one).

A ``Task`` says what a trainer and an evaluator need: its kind, its text column(s) (one, or
two for sentence pairs), its label column (the target text for generation), its label names,
its metrics and the primary one with its direction. ``task.load()`` returns a
``datasets.DatasetDict`` with ``train``, ``validation`` and ``test``, checked (columns exist,
no split is empty, no label appears at validation/test time that train never had) and with
class labels encoded as a ``ClassLabel`` column. Generation tasks also get a ``references``
column: every target of the same source within its split (E2E has several per input).

``tasks.resolve.get_task(spec, registry, **options)`` resolves a spec string, in this order:

- ``file:PATH`` (.csv, .tsv, .json, .jsonl, .parquet) with ``text_column``, ``label_column``;
- ``hub:NAME`` (anything ``datasets.load_dataset`` takes) with the same column options;
- a GLUE/SuperGLUE name (``glue/sst2``, ``super_glue/boolq``, ...) from a small table;
- a name registered by a plugin through ``register_tasks`` (the built-in ones ship their data).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from peftbench.errors import ConfigError, unknown
from peftbench.tasks.checks import absent_labels, check_label_values, check_rows, invalid_label

if TYPE_CHECKING:
    import datasets

KINDS = ("classification", "generation")
SPLITS = ("train", "validation", "test")
#: how a split carved from train describes itself (``sources.carve``)
CARVED = "carved from train"
REFERENCES = "references"


@dataclass
class Task:
    """A task: columns, labels and metrics, plus ``builder`` returning its raw splits.

    ``builder()`` returns a DatasetDict with train/validation/test (labels as names, ids or
    a ClassLabel column); ``load`` checks and encodes it. Empty ``labels`` are inferred from
    train at the first load. For generation, ``text_columns[0]`` is the source and
    ``label_column`` the target.
    """

    name: str
    kind: str
    text_columns: tuple[str, ...]
    label_column: str
    builder: Callable[[], "datasets.DatasetDict"] = field(repr=False, compare=False)
    labels: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    primary_metric: str = ""
    direction: str = ""
    description: str = ""
    #: rows without text or label are dropped (with a warning) instead of refused
    drop_invalid: bool = False
    _full: Any = field(default=None, init=False, repr=False, compare=False)
    #: where each split came from: the task's own, or carved from train (set at the first load)
    origins: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    #: what the checks found that a user should know before training (dropped rows, labels a split lacks)
    warnings: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from peftbench.tasks.metrics import DEFAULTS, METRICS

        where = f"task {self.name!r}"
        if self.kind not in KINDS:
            raise ConfigError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(self.text_columns, str):
            self.text_columns = (self.text_columns,)
        self.text_columns = tuple(self.text_columns)
        allowed = (1, 2) if self.kind == "classification" else (1,)
        if len(self.text_columns) not in allowed:
            raise ConfigError(f"{where}: text_columns must name {' or '.join(map(str, allowed))} column(s), "
                              f"got {list(self.text_columns)}")
        self.labels = tuple(str(label) for label in self.labels)
        self.metrics = tuple(self.metrics) or DEFAULTS[self.kind]
        for metric in self.metrics:
            if metric not in METRICS:
                raise ConfigError(f"{where}: {unknown('metric', metric, METRICS)}")
        self.primary_metric = self.primary_metric or self.metrics[0]
        if self.primary_metric not in self.metrics:
            raise ConfigError(f"{where}: primary_metric {self.primary_metric!r} is not among its metrics "
                              f"{list(self.metrics)}")
        self.direction = self.direction or METRICS[self.primary_metric]
        if self.direction not in ("max", "min"):
            raise ConfigError(f"{where}: direction {self.direction!r} must be 'max' or 'min'")

    @property
    def source_column(self) -> str:
        return self.text_columns[0]

    @property
    def target_column(self) -> str:
        return self.label_column

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def load(self, limit_train: int | None = None, limit_eval: int | None = None, seed: int = 0) -> "datasets.DatasetDict":
        """train/validation/test, checked and encoded; limits take seeded subsamples."""
        import datasets

        if self._full is None:
            self._full = prepare(self, self.builder())
            self.origins = {split: (self._full[split].info.description or "") if (self._full[split].info.description
                                                                                 or "").startswith(CARVED)
                            else f"the task's own {split} split" for split in SPLITS}
        return datasets.DatasetDict({
            "train": _limit(self, "train", self._full["train"], limit_train, seed),
            "validation": _limit(self, "validation", self._full["validation"], limit_eval, seed),
            "test": _limit(self, "test", self._full["test"], limit_eval, seed),
        })


def _limit(task: Task, split: str, ds, limit: int | None, seed: int):
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"task {task.name!r}: a {split} limit must be a positive integer, got {limit!r}")
    return ds if limit >= len(ds) else ds.shuffle(seed=seed).select(range(limit))


# -- checking and encoding ---------------------------------------------------------------
@contextmanager
def quiet_datasets():
    """No datasets progress bars for the small column edits done here (restored after)."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def prepare(task: Task, raw) -> "datasets.DatasetDict":
    """Check a builder's DatasetDict against the task; encode labels; add references."""
    with quiet_datasets():
        return _prepare(task, raw)


def _prepare(task: Task, raw) -> "datasets.DatasetDict":
    import datasets

    where = f"task {task.name!r}"
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ConfigError(f"{where}: split(s) {missing} missing; the data has {sorted(raw)}")
    splits = {}
    for split in SPLITS:
        if len(raw[split]) == 0:
            raise ConfigError(f"{where}: the {split} split is empty")
        columns = raw[split].column_names
        for name in (*task.text_columns, task.label_column):
            if name not in columns:
                raise ConfigError(f"{where}: column {name!r} is not in the {split} split; "
                                  f"columns there: {', '.join(columns)}")
        splits[split] = _valid_rows(task, split, raw[split])
    if task.kind == "classification":
        splits = _encode_labels(task, splits)
    else:
        splits = {s: _add_references(task, ds) for s, ds in splits.items()}
    return datasets.DatasetDict(splits)


def _valid_rows(task: Task, split: str, ds):
    """``ds`` without rows that lack text or label (``drop_invalid``), else an error naming them."""
    label = task.label_column if task.kind == "classification" else None
    values = {name: column(ds, name) for name in dict.fromkeys((*task.text_columns, task.label_column))}
    keep, dropped = check_rows(f"task {task.name!r}", values, label, task.drop_invalid, f"the {split} split")
    if dropped is None:
        return ds
    task.warnings.append(dropped)
    if not keep:
        raise ConfigError(f"task {task.name!r}: the {split} split is empty once its invalid rows are dropped")
    return ds.select(keep).flatten_indices()


def _label_names(task: Task, train) -> tuple[tuple[str, ...], Callable[[Any], str]]:
    """The label names and a function from a stored label value to its name."""
    import datasets

    feature = train.features[task.label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
        return names, lambda v: names[v] if isinstance(v, int) and 0 <= v < len(names) else str(v)
    if task.labels:
        return task.labels, str
    seen = {str(v) for v in column(train, task.label_column) if not _missing(v)}
    numeric = all(_is_number(v) for v in seen)
    return tuple(sorted(seen, key=(float if numeric else str))), str


def column(ds, name: str) -> list:
    """A column as a Python list (one Arrow conversion; iterating a Column is ~50x slower)."""
    return ds[name][:]


def _missing(value) -> bool:
    """None, an empty string (a blank CSV cell), NaN (a gap pandas filled) or a missing-value marker."""
    return invalid_label(value) is not None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _encode_labels(task: Task, splits: dict) -> dict:
    import datasets

    where = f"task {task.name!r}"
    names, to_name = _label_names(task, splits["train"])
    index = {name: i for i, name in enumerate(names)}
    train_names, counts = set(), {}
    for split in SPLITS:
        values = [None if _missing(v) else to_name(v) for v in column(splits[split], task.label_column)]
        if None in values:
            raise ConfigError(f"{where}: the {split} split has rows without a label in {task.label_column!r}")
        found = set(values)
        if split == "train":
            train_values = values
            outside = found - set(index)
            if outside:
                raise ConfigError(f"{where}: train has label(s) {sorted(outside)} outside the task's labels "
                                  f"{list(names)}")
            train_names = found
        elif found - train_names:
            raise ConfigError(f"{where}: the {split} split has label(s) {sorted(found - train_names)} never seen "
                              f"in train (train labels: {sorted(train_names)})")
        ids = [index[v] for v in values]
        features = splits[split].features.copy()
        features[task.label_column] = datasets.ClassLabel(names=list(names))
        splits[split] = splits[split].remove_columns(task.label_column).add_column(
            task.label_column, ids, feature=features[task.label_column])
        for v in values:
            counts.setdefault(v, {}).setdefault(split, 0)
            counts[v][split] += 1
    check_label_values(where + " (train split)", task.label_column, train_values)  # after: unseen labels say more
    task.labels = names
    carved = any((splits[s].info.description or "").startswith(CARVED) for s in ("validation", "test"))
    task.warnings += absent_labels(where, counts, carved)
    return splits


def _add_references(task: Task, ds):
    import datasets

    targets: dict[str, list[str]] = {}
    sources = column(ds, task.source_column)
    for source, target in zip(sources, column(ds, task.target_column)):
        if not isinstance(target, str):
            raise ConfigError(f"task {task.name!r}: target column {task.target_column!r} holds {type(target).__name__}, "
                              "not text")
        targets.setdefault(source, []).append(target)
    refs = [targets[source] for source in sources]
    if REFERENCES in ds.column_names:
        ds = ds.remove_columns(REFERENCES)
    return ds.add_column(REFERENCES, refs, feature=datasets.Sequence(datasets.Value("string")))
