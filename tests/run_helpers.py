"""Tiny real inputs for runner tests: a random model saved as a Hugging Face folder, and a CSV task.

The model folder (config, weights, a byte-level tokenizer) loads through the same
``load_backbone`` path as ``minilm``; the CSV loads through the tasks' ``file:`` source.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from conftest import tiny_config

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "was", "plot", "a", "very", "and", "film", "acting"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: 256 byte symbols + 4 specials, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def make_tiny_model(directory: Path, arch: str = "bert", causal: bool = False, positions: int = 128) -> Path:
    """A 2-layer random ``arch`` saved (without a task head) with its tokenizer in ``directory``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(config, name):
            setattr(config, name, positions)
    config.pad_token_id = tokenizer.pad_token_id
    if arch in ("gpt2", "llama"):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_sentiment_csv(path: Path, rows: int = 120, seed: int = 0) -> Path:
    """Short synthetic reviews whose label is carried by one sentiment word."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if positive else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg"])
    return path


def train_tiny_suite(root: Path, training: str, methods: str, rows: int) -> dict:
    """Train ``methods`` at 5% on a tiny BERT and a ``rows``-row sentiment CSV with the suite YAML ``training``,
    through ``peftbench run`` (suite ``s`` under ``root/out``); the paths tests need."""
    import argparse

    from peftbench.running.runner import add_run_arguments, main_run

    model = make_tiny_model(root / "tiny-bert")
    data = make_sentiment_csv(root / "reviews.csv", rows=rows)
    (root / "fast.yaml").write_text(training)
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(["--config", str(root / "fast.yaml"), "--backbone", str(model), "--task",
                              f"file:{data}", "--text-column", "review", "--label-column", "sentiment",
                              "--methods", methods, "--budget", "5%", "--out", str(root / "out"),
                              "--suite", "s", "--quiet"])
    assert main_run(args) == 0
    return {"root": root, "dir": root / "out" / "s", "model": model}


def kill_9_run_when(argv: list[str], cwd: Path, poll, ready, timeout: float, what: str):
    """Start ``peftbench run argv`` in a subprocess, SIGKILL it as soon as ``ready(poll())`` holds.

    ``poll()`` reads the store (a process-safe, read-only query); the test fails if the run ends or
    ``timeout`` seconds pass before that moment (``what`` names it).
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest

    proc = subprocess.Popen([sys.executable, "-m", "peftbench.running.runner", *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    seen = None
    try:
        while time.time() < deadline:
            seen = poll()
            if ready(seen):
                return
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        pytest.fail(f"the run never had {what}: {seen}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
