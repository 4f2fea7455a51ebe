"""Macro-F1: the unweighted mean over classes of each class's F1 (0..1), via scikit-learn.

Classes are those seen in the references or the predictions; a class never predicted
scores F1 = 0 (no warning).
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean of per-class F1 = 2PR/(P+R), every class weighted equally, 0..1.",
            citation="",
            inputs_description="predictions, references: lists of integer label ids of equal length.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}
