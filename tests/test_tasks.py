"""Tasks: the bundled data (counts, splits, labels, determinism), file:/hub: loading, bad input."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pandas as pd
import pytest

import peftbench
from peftbench.tasks.sources import packaged_meta

# name: (train, validation, test, labels); counts measured from the packaged files
BUNDLED = {
    "movie_sentiment": (8454, 1056, 1056, ("negative", "positive")),
    "rotten_tomatoes": (3891, 486, 486, ("rotten", "fresh")),
    "trec": (4305, 538, 538, ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")),
    "sms_spam": (3616, 453, 453, ("ham", "spam")),
    "e2e_nlg": (727, 121, 138, ()),
}
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def loaded():
    """Every bundled task loaded once through the registry, as a user would."""
    return {name: peftbench.get_task(name).load() for name in BUNDLED}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_counts_labels_and_disjoint_splits(name, loaded):
    task = peftbench.get_registry().task(name)
    assert peftbench.get_task(name) is task
    data = loaded[name]
    *counts, labels = BUNDLED[name]
    assert [len(data[s]) for s in SPLITS] == counts
    assert packaged_meta(name)["counts"] == dict(zip(SPLITS, counts))
    key = task.source_column if task.kind == "generation" else task.text_columns[0]
    keys = {s: set(data[s][key][:]) for s in SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    if task.kind == "classification":
        assert task.labels == labels
        assert task.direction == "max" and task.primary_metric in task.metrics
        for split in SPLITS:
            assert tuple(data[split].features["label"].names) == labels
            assert set(data[split]["label"][:]) == set(range(len(labels)))  # every class in every split
            assert len(keys[split]) == len(data[split])  # no repeated text inside a split either
    else:
        assert (task.kind, task.primary_metric, task.direction) == ("generation", "bleu", "max")


def test_label_proportions_are_stratified(loaded):
    """Each split's share of a class is within one row of train's share."""
    for name in ("movie_sentiment", "sms_spam", "trec"):
        labels = {s: loaded[name][s].select_columns(["label"]).to_dict()["label"] for s in SPLITS}
        for label in set(labels["train"]):
            share = labels["train"].count(label) / len(labels["train"])
            for split in ("validation", "test"):
                assert abs(labels[split].count(label) - share * len(labels[split])) <= 1.0, (name, label, split)


def test_movie_sentiment_label_is_the_sign_of_the_rating(loaded):
    data = loaded["movie_sentiment"]
    for split in SPLITS:
        columns = data[split].select_columns(["score", "label"]).to_dict()
        scores, labels = columns["score"], columns["label"]
        assert all(score != 0 and label == (1 if score > 0 else 0) for score, label in zip(scores, labels))


def test_e2e_splits_by_meaning_representation(loaded):
    data = loaded["e2e_nlg"]
    sources = {s: set(data[s]["source"]) for s in SPLITS}
    assert [len(sources[s]) for s in SPLITS] == [171, 21, 21]
    for split in SPLITS:
        by_source: dict[str, list[str]] = {}
        for row in data[split]:
            by_source.setdefault(row["source"], []).append(row["target"])
        for row in data[split]:
            assert row["references"] == by_source[row["source"]]  # every reference of the MR, same split
    assert max(len(r) for r in data["test"]["references"]) > 1


@pytest.mark.parametrize("name", BUNDLED)
def test_loading_is_deterministic(name, loaded):
    fresh = dataclasses.replace(peftbench.get_task(name))  # a new Task, nothing cached: reads the file again
    assert fresh._full is None
    again = fresh.load()
    for split in SPLITS:
        assert again[split].to_list() == loaded[name][split].to_list()
    first = fresh.load(limit_train=40, limit_eval=7, seed=3)
    second = fresh.load(limit_train=40, limit_eval=7, seed=3)
    other = fresh.load(limit_train=40, limit_eval=7, seed=4)
    assert [len(first[s]) for s in SPLITS] == [40, 7, 7]
    assert first["train"].to_list() == second["train"].to_list()
    assert first["train"].to_list() != other["train"].to_list()
    assert set(first["test"][fresh.text_columns[0]][:]) <= set(loaded[name]["test"][fresh.text_columns[0]][:])


# -- file: ---------------------------------------------------------------------------------
def _table(n_per_label=(40, 30, 30)):
    rows = []
    for label, n in zip(("cat", "dog", "eel"), n_per_label):
        rows += [{"sentence": f"{label} sentence number {i}", "other": f"second {i}", "y": label} for i in range(n)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_task_splits_by_seed(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    table = _table()
    {".csv": lambda: table.to_csv(path, index=False),
     ".jsonl": lambda: table.to_json(path, orient="records", lines=True),
     ".parquet": lambda: table.to_parquet(path)}[suffix]()
    task = peftbench.get_task(f"file:{path}", text_column="sentence", label_column="y")
    data = task.load()
    assert task.labels == ("cat", "dog", "eel")  # inferred from train, sorted
    assert [len(data[s]) for s in SPLITS] == [80, 10, 10]  # 10% per label: 4+3+3 each
    assert [data["test"]["y"].count(i) for i in range(3)] == [4, 3, 3]
    assert data["test"].features["y"].names == ["cat", "dog", "eel"]
    texts = {s: set(data[s]["sentence"]) for s in SPLITS}
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert set().union(*texts.values()) == set(table["sentence"])
    again = peftbench.get_task(f"file:{path}", text_column="sentence", label_column="y").load()
    assert again["test"].to_list() == data["test"].to_list()
    reseeded = peftbench.get_task(f"file:{path}", text_column="sentence", label_column="y", split_seed=1).load()
    assert set(reseeded["test"]["sentence"]) != texts["test"]


def test_file_task_with_split_column_and_pairs(tmp_path):
    table = _table()
    table["split"] = ["train"] * 80 + ["dev"] * 10 + ["test"] * 10
    table = table.sample(frac=1.0, random_state=0)  # split column, not row order, decides
    table.loc[table["split"] != "train", "y"] = "cat"  # dev/test only hold a label train has
    path = tmp_path / "pairs.csv"
    table.to_csv(path, index=False)
    task = peftbench.get_task(f"file:{path}", text_columns="sentence,other", label_column="y")
    data = task.load()
    assert task.text_columns == ("sentence", "other")
    assert [len(data[s]) for s in SPLITS] == [80, 10, 10]
    assert set(data["validation"]["sentence"]) == set(table[table["split"] == "dev"]["sentence"])
    assert "split" not in data["train"].column_names


def test_file_generation_task(tmp_path):
    rows = [{"source": f"mr {i % 5}", "target": f"text {i}"} for i in range(50)]
    path = tmp_path / "gen.json"
    path.write_text(json.dumps(rows))
    task = peftbench.get_task(f"file:{path}", kind="generation")
    data = task.load()
    assert (task.source_column, task.target_column, task.metrics) == ("source", "target", ("bleu", "rouge_l"))
    assert sum(len(data[s]) for s in SPLITS) == 50
    for row in data["test"]:
        assert row["target"] in row["references"]


def test_hub_task_through_datasets_load_dataset(tmp_path):
    """hub:NAME goes through datasets.load_dataset; a local folder is a name it accepts offline."""
    folder = tmp_path / "toy"
    folder.mkdir()
    table = _table()
    table.iloc[:90].to_csv(folder / "train.csv", index=False)
    _table((5, 3, 2)).to_csv(folder / "test.csv", index=False)
    task = peftbench.get_task(f"hub:{folder}", text_column="sentence", label_column="y")
    data = task.load()
    assert task.labels == ("cat", "dog", "eel")
    assert len(data["test"]) == 10  # the dataset's own labelled test split is kept
    assert len(data["validation"]) == 9 and len(data["train"]) == 81  # carved from train: 4 + 3 + 2


# -- bad input -----------------------------------------------------------------------------
def _csv(tmp_path, table, name="bad.csv"):
    path = tmp_path / name
    table.to_csv(path, index=False)
    return f"file:{path}"


def test_unknown_task_suggests_a_name():
    with pytest.raises(peftbench.ConfigError, match=r"unknown task 'movie_sentimnt' \(did you mean 'movie_sentiment'\?\)"):
        peftbench.get_task("movie_sentimnt")
    with pytest.raises(peftbench.ConfigError, match=r"did you mean 'glue/sst2'"):
        peftbench.get_task("glue/sst")
    with pytest.raises(peftbench.ConfigError, match="regression"):
        peftbench.get_task("glue/stsb")


def test_unknown_column_names_the_columns(tmp_path):
    spec = _csv(tmp_path, _table())
    with pytest.raises(peftbench.ConfigError, match=r"column 'text' is not in the train split; columns there: sentence, other, y"):
        peftbench.get_task(spec, label_column="y")
    with pytest.raises(peftbench.ConfigError, match=r"column 'labels' .* sentence, other, y"):
        peftbench.get_task(spec, text_column="sentence", label_column="labels")


def test_label_unseen_in_train(tmp_path):
    table = _table()
    table["split"] = ["train"] * 80 + ["validation"] * 10 + ["test"] * 10
    table.loc[:79, "y"] = "cat"
    table.loc[99, "y"] = "yak"
    with pytest.raises(peftbench.ConfigError, match=r"the validation split has label\(s\) \['eel'\] never seen in train \(train labels: \['cat'\]\)"):
        peftbench.get_task(_csv(tmp_path, table), text_column="sentence", label_column="y")
    table.loc[80:89, "y"] = "cat"
    with pytest.raises(peftbench.ConfigError, match=r"the test split has label\(s\) \['eel', 'yak'\] never seen"):
        peftbench.get_task(_csv(tmp_path, table, "b.csv"), text_column="sentence", label_column="y")


def test_empty_split(tmp_path):
    with pytest.raises(peftbench.ConfigError, match=r"the file is too small for train/validation/test \(4 rows; "
                                                    r"at least 18 needed"):
        peftbench.get_task(_csv(tmp_path, _table((2, 1, 1))), text_column="sentence", label_column="y")
    table = _table()
    table["split"] = "test"
    with pytest.raises(peftbench.ConfigError, match="the train split is empty"):
        peftbench.get_task(_csv(tmp_path, table, "t.csv"), text_column="sentence", label_column="y")
    import datasets

    empty = datasets.Dataset.from_dict({"text": [], "label": []})
    full = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
    task = peftbench.Task(name="mine", kind="classification", text_columns=("text",), label_column="label",
                          builder=lambda: datasets.DatasetDict(train=full, validation=full, test=empty))
    with pytest.raises(peftbench.ConfigError, match="task 'mine': the test split is empty"):
        task.load()


def test_blank_label_cell(tmp_path):
    table = _table()
    table.loc[5, "y"] = ""
    with pytest.raises(peftbench.ConfigError, match=r"1 of 100 rows cannot be trained on \(no text or no label\): "
                                                    r"row 6 \('y' empty\)"):
        peftbench.get_task(_csv(tmp_path, table), text_column="sentence", label_column="y")


def test_tasks_pickle(tmp_path):
    """Tasks travel to worker processes (Ray, accelerate): every kind must pickle and still load."""
    file_task = peftbench.get_task(_csv(tmp_path, _table()), text_column="sentence", label_column="y")
    for task in (peftbench.get_task("e2e_nlg"), peftbench.get_task("glue/sst2"), file_task):
        copy = pickle.loads(pickle.dumps(task))
        assert (copy.name, copy.labels, copy.metrics) == (task.name, task.labels, task.metrics)
    assert len(pickle.loads(pickle.dumps(file_task)).load()["test"]) == 10


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(peftbench.ConfigError, match="no such file"):
        peftbench.get_task(f"file:{tmp_path / 'nope.csv'}")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(peftbench.ConfigError, match="unsupported file type '.txt'"):
        peftbench.get_task(f"file:{tmp_path / 'x.txt'}")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(peftbench.ConfigError, match="could not read"):
        peftbench.get_task(f"file:{tmp_path / 'broken.parquet'}")


def test_bad_options_and_definitions(tmp_path):
    with pytest.raises(peftbench.ConfigError, match=r"unknown option\(s\) \['text_colum'\]"):
        peftbench.get_task(_csv(tmp_path, _table()), text_colum="sentence")
    with pytest.raises(peftbench.ConfigError, match="apply only to file: and hub: tasks"):
        peftbench.get_task("trec", text_column="x")
    with pytest.raises(peftbench.ConfigError, match="limit must be a positive integer"):
        peftbench.get_task("trec").load(limit_train=0)
    common = dict(name="t", text_columns=("text",), label_column="label", builder=dict)
    with pytest.raises(peftbench.ConfigError, match="kind 'regression' is not one of"):
        peftbench.Task(kind="regression", **common)
    with pytest.raises(peftbench.ConfigError, match=r"unknown metric 'acc'"):
        peftbench.Task(kind="classification", metrics=("acc",), **common)
    with pytest.raises(peftbench.ConfigError, match="primary_metric 'bleu' is not among"):
        peftbench.Task(kind="classification", primary_metric="bleu", **common)


def test_benchmark_names_need_the_hub(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the library's own offline switch,
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # so it fails without retries
    task = peftbench.get_task("glue/mnli")
    assert (task.text_columns, task.labels) == (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"))
    with pytest.raises(peftbench.ConfigError, match=r"loads from the Hugging Face hub .*nyu-mll/glue.*needs network access"):
        task.load()
