"""Matthews correlation coefficient (-1..1; 0 for a constant predictor), via scikit-learn.

Binary: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); multiclass uses Gorodkin's
generalisation (what scikit-learn computes).
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Matthews correlation between predicted and reference label ids, -1..1.",
            citation="Matthews (1975); Gorodkin (2004) for K classes.",
            inputs_description="predictions, references: lists of integer label ids of equal length.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"mcc": float(matthews_corrcoef(references, predictions))}
