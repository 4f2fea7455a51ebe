"""Corpus BLEU (0..100) with sacrebleu's defaults (13a tokenisation, exponential smoothing off).

Each prediction may have any number of references (E2E has 1 to 18 per input); sacrebleu
takes them as reference streams, padded with None where an input has fewer.
"""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU, 0..100, several references per prediction allowed.",
            citation="Papineni et al. (2002); Post (2018), sacrebleu.",
            inputs_description="predictions: list of strings; references: list of lists of strings (or strings).",
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        depth = max((len(r) for r in refs), default=1)
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(depth)]  # depth x N
        return {"bleu": float(sacrebleu.corpus_bleu(predictions, streams).score)}
