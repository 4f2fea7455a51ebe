"""Named adapters on one backbone: add several trials' adapters, switch which one is active, remove one,
save one, or run one batch whose texts name different adapters. One adapter is active at a time: switching
removes the active injection (the backbone is restored bit for bit) and applies the next through
``peftbench.apply`` with its stored weights and its own task head. Every adapter added must have been
trained on the same base (the recorded weight hashes agree) for the same task kind; its head may have
another number of labels (another task): switching to it rebuilds the head's output layer at that width
(``Backbone.resize_head``), the base model's modules and weights staying the same objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftbench.contract.injection import CONFIG_FILE, WEIGHTS_FILE
from peftbench.errors import ConfigError, unknown

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.using.model import Model

#: the name of the adapter a model was loaded with
DEFAULT = "default"
HEAD = "head."


@dataclass
class Stored:
    """One named adapter: its saved config (``adapter_config.json``), weights (with ``head.*``), task facts."""

    meta: dict
    state: dict[str, torch.Tensor]
    labels: tuple[str, ...]
    kind: str
    max_length: int
    source: str
    notes: list[str] = field(default_factory=list)


def stored_from_folder(folder: Path, meta: dict, facts: dict, notes: list[str]) -> Stored:
    from safetensors.torch import load_file

    return Stored(meta, load_file(str(folder / WEIGHTS_FILE)), facts["labels"], facts["kind"], facts["max_length"],
                  str(folder), notes)


def current_state(model: "Model") -> dict[str, torch.Tensor]:
    """The active injection's weights and the head, as an adapter folder stores them."""
    state = {k: v.detach().cpu().clone() for k, v in model.injection.state_dict().items()}
    state.update({HEAD + k: p.detach().cpu().clone() for k, p in model.backbone.head_parameters().items()})
    return state


def check_compatible(model: "Model", name: str, new: Stored) -> None:
    """Refuse an adapter of another base or task kind than the model's backbone, or whose head does not fit
    it at the adapter's own number of labels."""
    base = model.meta.get("backbone_sha256")
    theirs = new.meta.get("backbone_sha256")
    if base and theirs and base != theirs:
        raise ConfigError(f"adapter {name!r} ({new.source}) was trained on backbone {new.meta['backbone']!r} with "
                          f"weights {theirs[:19]}..., this model's backbone {model.meta.get('backbone')!r} has "
                          f"{base[:19]}...: another base model")
    if not (base and theirs) and new.meta.get("backbone") != model.meta.get("backbone"):
        raise ConfigError(f"adapter {name!r} was trained on backbone {new.meta.get('backbone')!r}, this model's is "
                          f"{model.meta.get('backbone')!r}")
    if new.kind != model.kind:
        raise ConfigError(f"adapter {name!r} is a {new.kind} adapter; this model's backbone is built for {model.kind}")
    if new.kind != "classification":
        return
    head = {k[len(HEAD):]: tuple(v.shape) for k, v in new.state.items() if k.startswith(HEAD)}
    if not head:
        if len(new.labels) != model.backbone.config.num_labels:
            raise ConfigError(f"adapter {name!r} saved no task head and has {len(new.labels)} labels; this "
                              f"backbone's head has {model.backbone.config.num_labels}: load it on its own with "
                              f"peftbench.load")
        return
    fits = model.backbone.head_shapes(len(new.labels))
    if head != fits:
        differ = "; ".join(f"{k} saved {head.get(k)}, backbone {fits.get(k)}"
                           for k in sorted(set(head) | set(fits)) if head.get(k) != fits.get(k))
        raise ConfigError(f"adapter {name!r} has a head for {len(new.labels)} labels {list(new.labels)} that does "
                          f"not fit this backbone's head ({differ})")


def add(model: "Model", name: str, path, **selectors) -> None:
    """Read a trial's adapter (what ``peftbench.load`` accepts, exports aside) into ``model.adapters``."""
    from peftbench.using.locate import locate
    from peftbench.using.meta import adapter_meta, check_method, task_facts

    found = locate(path, selectors.pop("method", None), registry=model.registry, **selectors)
    if found.export:
        raise ConfigError(f"{found.path} is an export; add_adapter takes a suite's trial, a trial or adapter folder")
    meta = adapter_meta(found.path)
    check_method(meta, found.path, model.registry)
    notes: list[str] = []
    stored = stored_from_folder(found.path, {**meta, "trial_id": found.trial_id},
                                task_facts(meta, found, model.registry, notes), notes)
    check_compatible(model, name, stored)
    model.adapters[name] = stored
    model.notes.extend(notes)


def activate(model: "Model", stored: Stored) -> None:
    """Take the active injection off (if any) and put ``stored`` on, with its own head (resized to its number
    of labels when that differs, the config naming its labels); on failure nothing is active."""
    from peftbench.contract.apply import apply

    if model.injection is not None:
        model.injection.remove()
        model.injection = None
    head = {k[len(HEAD):]: v for k, v in stored.state.items() if k.startswith(HEAD)}
    if head and stored.kind == "classification":
        model.backbone.resize_head(len(stored.labels))
    method = model.registry.method(stored.meta["method"])
    injection = apply(method, model.backbone, stored.meta["config"])
    try:
        if stored.meta.get("finalized"):
            injection.finalize()
        injection.load_state_dict(stored.state)
        if head:
            model.backbone.load_head(head)
    except BaseException:
        injection.remove()
        raise
    if stored.kind == "classification":
        name_labels(model.backbone.config, stored.labels)
    model.backbone.model.to(model.device).eval()
    model.injection = injection
    model.meta, model.labels, model.kind = dict(stored.meta), stored.labels, stored.kind
    model.max_length, model.source = stored.max_length, stored.source


def name_labels(config, labels) -> None:
    """``config.id2label``/``label2id`` name the head's outputs as the task did (when the counts agree)."""
    if labels and len(labels) == config.num_labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}


def check_names(model: "Model", texts, names) -> list[str]:
    """One known adapter name per text, or a one-line error saying what is wrong."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"adapter_names takes a list of adapter names, one per text, not "
                          f"{type(names).__name__} {names!r:.60}")
    if len(names) != len(texts):
        raise ConfigError(f"adapter_names has {len(names)} names for {len(texts)} texts: give one adapter name "
                          f"per text")
    for name in names:
        if not isinstance(name, str) or name not in model.adapters:
            raise ConfigError("adapter_names: " + unknown("adapter", str(name), model.adapters))
    return list(names)


def mixed_logits(model: "Model", texts, names: list[str], batch_size: int) -> list[torch.Tensor]:
    """Each text's logits under its own adapter, in the input order. The rows are grouped by adapter and each
    group runs under that adapter alone (one activation per distinct adapter, the base model run once per
    group): the adapters named other than the active one first, in the order they first appear, then the
    active one's group, which also restores it (or the active one is restored after the last group)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    active = model.active_adapter
    order = [n for n in groups if n != active] + ([active] if active in groups else [])
    out: list[torch.Tensor | None] = [None] * len(texts)
    try:
        for name in order:
            if name != model.active_adapter:
                model.set_adapter(name)
            rows = groups[name]
            for i, row in zip(rows, model.logits([texts[i] for i in rows], batch_size)):
                out[i] = row
    finally:
        if model.active_adapter != active:
            restore(model, active)
    return out


def restore(model: "Model", name: str | None) -> None:
    """Make ``name`` active again; None: no adapter active (the active one's weights kept, its injection off)."""
    if name is not None:
        model.set_adapter(name)
    elif model.injection is not None:
        model.adapters[model.active_adapter].state = current_state(model)
        model.injection.remove()
        model.injection, model.active_adapter = None, None


def save(stored: Stored, directory: str | Path) -> Path:
    """Write ``stored`` as an adapter folder (the trials' format: ``peftbench.load`` reads it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stored.state.items()}, str(directory / WEIGHTS_FILE))
    meta = {k: v for k, v in stored.meta.items() if k != "trial_id"}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def lookup(adapters: dict[str, Stored], name: str) -> Stored:
    if name not in adapters:
        raise ConfigError(unknown("adapter", name, adapters))
    return adapters[name]
