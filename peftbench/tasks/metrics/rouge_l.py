"""ROUGE-L F-measure (0..100), via rouge-score: LCS-based, averaged over predictions.

With several references, a prediction scores its best reference (rouge-score's score_multi).
Tokens: rouge-score's default (lower-cased alphanumeric words, no stemming).
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean over predictions of the best ROUGE-L F1 against its references, 0..100.",
            citation="Lin (2004); rouge-score.",
            inputs_description="predictions: list of strings; references: list of lists of strings (or strings).",
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score_multi([r] if isinstance(r, str) else list(r), p)["rougeL"].fmeasure
                  for p, r in zip(predictions, references)]
        return {"rouge_l": 100.0 * sum(scores) / max(len(scores), 1)}
