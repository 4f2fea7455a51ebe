"""Metrics: each evaluate module against values computed by hand or by an independent formula."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

import peftbench
from peftbench.tasks.metrics import METRICS, compute_metrics, load_metric, module_path

PRED = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
REF = [0, 1, 2, 1, 1, 0, 2, 2, 0, 1]


def confusion(pred, ref, k):
    table = [[0] * k for _ in range(k)]  # table[true][pred]
    for p, r in zip(pred, ref):
        table[r][p] += 1
    return table


def macro_f1_by_hand(pred, ref, k):
    table = confusion(pred, ref, k)
    scores = []
    for c in range(k):
        tp = table[c][c]
        fp = sum(table[r][c] for r in range(k)) - tp
        fn = sum(table[c]) - tp
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / k


def mcc_by_hand(pred, ref, k):
    """Gorodkin's K-class MCC from the confusion matrix (the binary formula when k = 2)."""
    table = confusion(pred, ref, k)
    s = len(pred)
    c = sum(table[i][i] for i in range(k))
    p = [sum(table[r][j] for r in range(k)) for j in range(k)]  # predicted per class
    t = [sum(table[j]) for j in range(k)]  # true per class
    return (c * s - sum(pk * tk for pk, tk in zip(p, t))) / math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))


def test_accuracy_by_hand():
    assert load_metric("accuracy").compute(predictions=PRED, references=REF) == {"accuracy": pytest.approx(0.7)}
    assert load_metric("accuracy").compute(predictions=[1, 1], references=[0, 0])["accuracy"] == 0.0


def test_macro_f1_by_hand():
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 3, fp 1, fn 1 -> 6/8; class 2: tp 2, fp 1, fn 1 -> 4/6
    expected = (4 / 6 + 6 / 8 + 4 / 6) / 3
    assert macro_f1_by_hand(PRED, REF, 3) == pytest.approx(expected)
    assert load_metric("macro_f1").compute(predictions=PRED, references=REF)["macro_f1"] == pytest.approx(expected)
    # a class never predicted counts as F1 0: binary, always 0 -> class 0 F1 = 2*3/(2*3+1) = 6/7, class 1 = 0
    got = load_metric("macro_f1").compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])["macro_f1"]
    assert got == pytest.approx((6 / 7 + 0) / 2)


def test_mcc_binary_and_multiclass():
    pred, ref = [1, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1, 1, 0]
    tp, tn, fp, fn = 3, 3, 1, 1
    binary = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # = 0.5
    assert binary == pytest.approx(0.5)
    assert load_metric("mcc").compute(predictions=pred, references=ref)["mcc"] == pytest.approx(binary)
    assert load_metric("mcc").compute(predictions=PRED, references=REF)["mcc"] == pytest.approx(mcc_by_hand(PRED, REF, 3))
    assert load_metric("mcc").compute(predictions=[1, 1, 1], references=[0, 1, 0])["mcc"] == 0.0  # constant predictor


def bleu_by_hand(hyps, refs_per_hyp, max_n=4):
    """Corpus BLEU on whitespace tokens: clipped n-gram precisions, closest-length brevity penalty."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hyps, refs_per_hyp):
        h, rs = hyp.split(), [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            most = Counter()
            for r in rs:
                most |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, most[g]) for g, c in grams.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * penalty * math.exp(log_precision)


def test_bleu_by_hand():
    bleu = load_metric("bleu")
    # unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3, equal lengths: (1/12)^(1/4)
    got = bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on a mat"]])["bleu"]
    assert got == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])["bleu"] == pytest.approx(100)
    hyps = ["the cat sat on the mat today", "a small dog barks at the red door", "there is a cafe near the river bank"]
    refs = [["the cat sat on a mat today", "today the cat is on the mat"],
            ["a little dog barks at the door"],
            ["near the river there is a cafe", "a cafe sits by the river bank", "there is a cafe on the river bank"]]
    expected = bleu_by_hand(hyps, refs)
    assert 30 < expected < 90  # a non-trivial case: several references, a brevity penalty of 1
    assert bleu.compute(predictions=hyps, references=refs)["bleu"] == pytest.approx(expected, abs=1e-6)


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_by_hand(hyp, ref):
    h, r = hyp.lower().split(), ref.lower().split()
    k = lcs(h, r)
    return 0.0 if k == 0 else 2 * (k / len(h)) * (k / len(r)) / (k / len(h) + k / len(r))


def test_rouge_l_by_hand():
    rouge = load_metric("rouge_l")
    # LCS("the cat sat on the mat", "the cat sat on a mat") = 5 of 6 both ways -> F = 5/6;
    # "a dog" vs "a dog barks": P 1, R 2/3 -> F 0.8; with two references the better one counts
    got = rouge.compute(predictions=["the cat sat on the mat", "a dog"],
                        references=[["the cat sat on a mat"], ["a dog barks", "cats only"]])["rouge_l"]
    assert got == pytest.approx(100 * (5 / 6 + 0.8) / 2)
    hyps = ["Blue Spice is a coffee shop in the city centre", "the mill serves cheap food near the river"]
    refs = ["in the city centre there is a coffee shop called Blue Spice", "cheap food is served at the mill by the river"]
    expected = 100 * sum(rouge_l_by_hand(h, r) for h, r in zip(hyps, refs)) / 2
    assert rouge.compute(predictions=hyps, references=refs)["rouge_l"] == pytest.approx(expected)


def test_compute_metrics_for_tasks():
    trec = peftbench.get_task("trec")
    labels = trec.labels
    pred = [labels[i] for i in PRED]  # names work as well as ids
    got = compute_metrics(trec, pred, REF)
    assert set(got) == set(trec.metrics) == {"accuracy", "macro_f1", "mcc"}
    assert got["accuracy"] == pytest.approx(0.7)
    assert got["macro_f1"] == pytest.approx(macro_f1_by_hand(PRED, REF, 3))  # sklearn averages classes present
    assert got["mcc"] == pytest.approx(mcc_by_hand(PRED, REF, 3))
    e2e = peftbench.get_task("e2e_nlg")
    got = compute_metrics(e2e, ["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert got == {"bleu": pytest.approx(100 * (1 / 12) ** 0.25), "rouge_l": pytest.approx(100 * 5 / 6)}
    with pytest.raises(peftbench.ConfigError, match="3 predictions for 2 references"):
        compute_metrics(trec, [0, 1, 2], [0, 1])
    with pytest.raises(peftbench.ConfigError, match=r"predicted label 'WHO' is not one of"):
        compute_metrics(trec, ["WHO"], ["HUM"])


def test_every_metric_is_an_evaluate_module_file():
    import evaluate

    for name in METRICS:
        path = module_path(name)
        source = Path(path).read_text()
        assert "import datasets\nimport evaluate\n" in source  # two lines: a combined import confuses evaluate
        module = evaluate.load(str(path), keep_in_memory=True)
        assert isinstance(module, evaluate.Metric)
    with pytest.raises(peftbench.ConfigError, match=r"unknown metric 'acuracy' \(did you mean 'accuracy'\?\)"):
        load_metric("acuracy")
