"""Data checks before any training: rows without text or label, label columns that cannot be
classes, files too small to split, labels a split lacks; errors name the rows, warnings count."""

from __future__ import annotations

import json

import pytest

import peftbench
from peftbench.running.runner import main as run_main


def _rows(n: int = 40, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"review number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def _write(path, rows) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return f"file:{path}"


# (file, row edits, what the error says)
BAD_ROWS = {
    "json null": (".jsonl", {3: None}, r"1 of 40 lines cannot be trained on .*: line 4 \('text' null/NaN\)"),
    "NaN cell": (".csv", {5: "NaN"}, r"1 of 40 rows cannot be trained on .*: row 6 \('text' 'NaN'\)"),
    "empty cell": (".csv", {6: ""}, r"row 7 \('text' empty\)"),
    "blank and number": (".jsonl", {0: "   ", 9: 5}, r"2 of 40 lines .*: lines 1 \('text' blank\), 10 \('text' int, not text\)"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_rows_without_text_are_named_or_dropped_with_a_count(tmp_path, case):
    suffix, edits, message = BAD_ROWS[case]
    rows = _rows()
    for i, value in edits.items():
        rows[i]["text"] = value
    spec = _write(tmp_path / f"data{suffix}", rows)
    with pytest.raises(peftbench.ConfigError, match=message + r"; fix them, or drop such rows with drop_invalid: true"):
        peftbench.get_task(spec)
    task = peftbench.get_task(spec, drop_invalid=True)
    data = task.load()
    kept = sum(len(data[s]) for s in ("train", "validation", "test"))
    assert kept == 40 - len(edits)
    assert task.warnings[0].endswith(f"; {40 - len(edits)} left") and f"dropped {len(edits)} of 40" in task.warnings[0]
    texts = {t for s in ("train", "validation", "test") for t in data[s]["text"]}
    assert all(isinstance(t, str) and t.strip() and t != "NaN" for t in texts)


def test_invalid_rows_of_a_given_split_are_named_by_split():
    import datasets

    good = datasets.Dataset.from_dict({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]})
    bad = datasets.Dataset.from_dict({"text": ["a b", None, "nan"], "label": ["x", "y", "y"]})
    make = lambda drop: peftbench.Task(name="mine", kind="classification", text_columns=("text",), label_column="label",
                                       drop_invalid=drop, builder=lambda: datasets.DatasetDict(train=good, validation=good,
                                                                                               test=bad))
    with pytest.raises(peftbench.ConfigError, match=r"2 of 3 rows of the test split cannot be trained on .*rows 2 "
                                                    r"\('text' null\), 3 \('text' 'nan'\)"):
        make(False).load()
    task = make(True)
    assert len(task.load()["test"]) == 1
    assert any("dropped 2 of 3 rows of the test split" in w for w in task.warnings)


@pytest.mark.parametrize("labels, message", [
    (("pos",), r"the label column 'label' has fewer than two classes \(only 'pos' in 40 rows\)"),
    (tuple(f"{0.137 * i:.3f}" for i in range(40)), r"the label column 'label' looks continuous \(40 distinct numbers "
                                                   r"in 40 rows, e.g. 0.0, 0.137, 0.274\)"),
])
def test_label_columns_that_cannot_be_classes(tmp_path, labels, message):
    with pytest.raises(peftbench.ConfigError, match=message):
        peftbench.get_task(_write(tmp_path / "data.csv", _rows(labels=labels)))


def test_integer_valued_and_few_float_labels_are_classes(tmp_path):
    task = peftbench.get_task(_write(tmp_path / "data.csv", _rows(60, labels=("0.5", "1.5", "2.5"))))
    assert task.labels == ("0.5", "1.5", "2.5")


def test_too_small_file_and_thin_label(tmp_path):
    with pytest.raises(peftbench.ConfigError, match=r"the file is too small for train/validation/test \(3 rows; at least "
                                                    r"12 needed: validation and test are each carved as 10% of every "
                                                    r"label, so each of 2 label\(s\) needs 6\)"):
        peftbench.get_task(_write(tmp_path / "three.csv", _rows(3)))
    rows = [{"text": f"t {i}", "label": "a"} for i in range(30)] + [{"text": f"u {i}", "label": "b"} for i in range(3)]
    task = peftbench.get_task(_write(tmp_path / "thin.csv", rows))
    assert task.warnings == [f"task 'file:{tmp_path / 'thin.csv'}': label 'b' has too few rows for the splits (train 3, "
                             "validation 0, test 0): it is never measured on validation and test; a carved split takes "
                             "10% of each label, so a label needs at least 6 rows to reach both"]


def test_dry_run_refuses_or_warns_before_any_training(tmp_path, capsys):
    spec = _rows()
    spec[3]["text"] = None
    task = _write(tmp_path / "null.jsonl", spec)
    argv = ["--task", task, "--methods", "lora", "--seeds", "1", "--out", str(tmp_path / "out"), "--dry-run"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 4 ('text' null/NaN)" in err
    assert run_main([*argv, "--drop-invalid"]) == 0
    captured = capsys.readouterr()
    assert "peftbench: warning: task" in captured.err and "dropped 1 of 40 lines" in captured.err
    assert "1 trials (0 already done, 1 to run)" in captured.out
    assert not (tmp_path / "out").exists()


def test_drop_invalid_needs_a_file_or_hub_task(capsys):
    assert run_main(["--task", "trec", "--methods", "lora", "--drop-invalid", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("peftbench run: error: --text-column/--label-column/--drop-invalid apply to file:/hub: tasks; give "
                   "one with --task file:PATH (this grid has trec)")
