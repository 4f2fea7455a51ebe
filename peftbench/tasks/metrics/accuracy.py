"""Accuracy: the fraction of predictions equal to their reference (0..1), via scikit-learn."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of exact matches between predicted and reference label ids, 0..1.",
            citation="",
            inputs_description="predictions, references: lists of integer label ids of equal length.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
