"""A loaded model ready to use: ``predict(texts)`` for classification, ``generate(prompts)`` for a
generative trial. It wraps a transformers model (with a peftbench injection on it, or a plain or
peft checkpoint) and its tokenizer, and names labels as the task did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from peftbench.errors import ConfigError


@dataclass(frozen=True)
class Prediction:
    """One text's prediction: its label by name, that label's probability, every label's."""

    label: str
    score: float
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "probs": self.probs}


@dataclass
class Model:
    """A ready model. ``kind`` is the task's (``classification`` or ``generation``)."""

    model: torch.nn.Module
    tokenizer: Any
    labels: tuple[str, ...]
    kind: str = "classification"
    max_length: int = 128
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: where it came from and what it is (method, config, backbone, hash, format ...)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: the peftbench pieces when loaded from a trial (None for an exported checkpoint)
    backbone: Any = None
    injection: Any = None
    #: what a user should know (an adapter written before label names were saved ...)
    notes: list[str] = field(default_factory=list)
    #: the plugins' registry (named adapters are applied through it)
    registry: Any = None
    #: named adapters on this backbone (``peftbench.using.named``); one is active at a time
    adapters: dict[str, Any] = field(default_factory=dict)
    active_adapter: str | None = None

    @property
    def method(self) -> str | None:
        return self.meta.get("method")

    # -- classification ------------------------------------------------------------------
    def _encode(self, texts: Sequence[str | tuple[str, str]]):
        if isinstance(texts, str):
            raise ConfigError("predict takes a list of texts, not one string: wrap it as [text]")
        if not texts:
            return None
        pairs = [isinstance(t, (tuple, list)) for t in texts]
        if any(pairs) and not all(pairs):
            raise ConfigError("predict takes texts or (text, text) pairs, not a mix of both")
        if all(pairs):
            if any(len(t) != 2 for t in texts):
                raise ConfigError("a sentence-pair text must be a (first, second) pair of two strings")
            args = ([str(t[0]) for t in texts], [str(t[1]) for t in texts])
        else:
            args = ([str(t) for t in texts],)
        enc = self.tokenizer(*args, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    @torch.no_grad()
    def logits(self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, *, adapter: str | None = None,
               adapter_names: Sequence[str] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The classifier's logits, (len(texts), num_labels), in float32 on the CPU.

        ``adapter``: run that named adapter (``set_adapter`` first when it is not the active one; it stays
        active). ``adapter_names``: one adapter name per text; returns a list of per-text logits (the adapters'
        label counts may differ), in the input order. This is a batching API, not a fused kernel: the rows are
        grouped by adapter and each group runs under its adapter alone (the base model runs once per distinct
        adapter and ``batch_size`` rows), with one activation per distinct adapter; the active adapter's group
        runs last, so it is active after the call (one more activation restores it when no text names it).
        Each text gets the logits its adapter gives alone."""
        if adapter_names is not None:
            return self._mixed(texts, adapter, adapter_names, batch_size)
        self._use(adapter)
        self._need("classification", "logits")
        self.model.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self._encode(texts[i:i + batch_size])
            out.append(self.model(**enc).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, texts: Sequence[str | tuple[str, str]], batch_size: int = 32, *, adapter: str | None = None,
                adapter_names: Sequence[str] | None = None) -> list[Prediction]:
        """Per text (or sentence pair): the label by name, its probability, every label's probability.

        ``adapter``/``adapter_names``: as for ``logits``; with ``adapter_names`` each text is named by its own
        adapter's labels."""
        if adapter_names is not None:
            preds = []
            for row, name in zip(self._mixed(texts, adapter, adapter_names, batch_size), adapter_names):
                labels = self.adapters[name].labels
                if row.shape[-1] != len(labels):
                    raise ConfigError(f"adapter {name!r} has {row.shape[-1]} outputs but {len(labels)} label names")
                preds.append(self._prediction(row.softmax(-1).tolist(), labels))
            return preds
        logits = self.logits(texts, batch_size, adapter=adapter)
        if logits.shape[-1] != len(self.labels):
            raise ConfigError(f"the model has {logits.shape[-1]} outputs but {len(self.labels)} label names")
        return [self._prediction(row, self.labels) for row in logits.softmax(-1).tolist()]

    @staticmethod
    def _prediction(row: list[float], labels: tuple[str, ...]) -> Prediction:
        best = max(range(len(row)), key=row.__getitem__)
        return Prediction(labels[best], row[best], dict(zip(labels, row)))

    def _use(self, adapter: str | None) -> None:
        """``adapter`` becomes the active adapter (nothing when it already is, or is None)."""
        if adapter is None:
            return
        self._need_adapters("adapter")
        if adapter != self.active_adapter:
            self.set_adapter(adapter)

    def _mixed(self, texts, adapter, adapter_names, batch_size: int) -> list[torch.Tensor]:
        from peftbench.using.named import check_names, mixed_logits

        if adapter is not None:
            raise ConfigError("give adapter (one adapter for every text) or adapter_names (one per text), not both")
        self._need_adapters("adapter_names")
        if isinstance(texts, str):
            raise ConfigError("predict takes a list of texts, not one string: wrap it as [text]")
        if self.kind != "classification":
            raise ConfigError(f"adapter_names runs classifiers; {self.source or 'this model'} is a {self.kind} "
                              f"model: use generate()")
        names = check_names(self, texts, adapter_names)
        return mixed_logits(self, texts, names, batch_size)

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
        """Greedy continuations; each prompt is wrapped in the template the trial trained on."""
        from peftbench.running.train import generate
        from peftbench.tasks.data import PROMPT

        self._need("generation", "generate")
        if isinstance(prompts, str):
            raise ConfigError("generate takes a list of prompts, not one string: wrap it as [prompt]")
        return generate(self.model, self.tokenizer, [PROMPT.format(source=p) for p in prompts],
                        batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=self.max_length,
                        device=self.device)

    def merge_and_unload(self) -> torch.nn.Module:
        """A plain transformers model with the active adapter folded into its weights (LoRA and other
        ``mergeable`` methods), the labels in its config; this Model is left as it was."""
        from peftbench.using.merge import merged_model

        return merged_model(self)

    # -- named adapters ------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path, method: str | None = None, budget: str | None = None,
                    seed: int = 0, **selectors) -> None:
        """Add another trial's adapter (the arguments of ``peftbench.load``) under ``name``; it must have been
        trained on this backbone (the same weights) for the same task kind, and brings its own head and labels
        (another task's: any number of labels). It stays inactive until ``set_adapter``."""
        from peftbench.using.named import add

        self._need_backbone("add_adapter")
        if not isinstance(name, str) or not name or name in self.adapters:
            raise ConfigError(f"adapter name {name!r} is {'taken' if name in self.adapters else 'empty'}; "
                              f"names in use: {', '.join(self.adapters)}")
        add(self, name, path, method=method, budget=budget, seed=seed, **selectors)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter (the active one comes off; the backbone is restored first), with
        its own head and labels: a head of another width replaces the head's output layer, the base model
        stays the same objects."""
        from peftbench.using.named import activate, current_state, lookup

        self._need_backbone("set_adapter")
        stored = lookup(self.adapters, name)
        if self.active_adapter is not None:  # keep what the active one holds now (it may have been trained on)
            self.adapters[self.active_adapter].state = current_state(self)
        self.active_adapter = None
        activate(self, stored)
        self.active_adapter = name

    def deactivate_adapter(self) -> None:
        """Take the active adapter off (the base restored bit for bit); it stays added, with what it holds
        now, and ``set_adapter`` puts it back. Nothing is active until then (predict refuses)."""
        from peftbench.using.named import current_state

        self._need_backbone("deactivate_adapter")
        if self.active_adapter is None:
            return
        self.adapters[self.active_adapter].state = current_state(self)
        self.injection.remove()
        self.injection, self.active_adapter = None, None

    def remove_adapter(self, name: str) -> None:
        """Forget ``name``; if it is active, its injection comes off and no adapter is active."""
        from peftbench.using.named import lookup

        lookup(self.adapters, name)
        if name == self.active_adapter:
            self.injection.remove()
            self.injection, self.active_adapter = None, None
        del self.adapters[name]

    def save_adapter(self, name: str, directory: str | Path) -> Path:
        """Write adapter ``name`` as an adapter folder that ``peftbench.load`` reads."""
        from peftbench.using.named import current_state, lookup, save

        stored = lookup(self.adapters, name)
        if name == self.active_adapter:
            stored.state = current_state(self)
        return save(stored, directory)

    def _need_backbone(self, what: str) -> None:
        if self.backbone is None or self.registry is None:
            raise ConfigError(f"{what}() needs a model loaded from a trial; {self.source} is an export")

    def _need_adapters(self, what: str) -> None:
        if self.backbone is None or self.registry is None:
            raise ConfigError(f"{what}= names adapters of a model loaded from a trial; {self.source} is an export "
                              f"with no named adapters")

    def _need(self, kind: str, what: str) -> None:
        if self.backbone is not None and self.injection is None:
            raise ConfigError(f"{what}() needs an active adapter: set_adapter(name) with one of "
                              f"{', '.join(self.adapters) or '(none: add_adapter first)'}")
        if self.kind != kind:
            other = "predict" if self.kind == "classification" else "generate"
            raise ConfigError(f"{what}() needs a {kind} model; {self.source or 'this model'} is a {self.kind} "
                              f"model: use {other}()")

    def __repr__(self) -> str:
        what = self.meta.get("method") or self.meta.get("export_format", "model")
        return f"<peftbench.Model {what} {self.kind} labels={list(self.labels)} from {self.source}>"
