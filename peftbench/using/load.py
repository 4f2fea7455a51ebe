"""``peftbench.load``: rebuild a trained adapter into a ready ``Model``.

From a trial: the backbone is loaded by the name it trained on, its weights are hashed and compared
with the hash the adapter recorded, the method (which must be installed) is applied with its stored
config through ``peftbench.apply``, and the saved weights and head are loaded after their names and
shapes are checked. From an export: the checkpoint loads through transformers (``merged``) or peft
(``peft``). Every mismatch is a one-line ``ConfigError`` naming what differs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from peftbench.errors import ConfigError
from peftbench.using.locate import EXPORT_META, Located, locate
from peftbench.using.meta import adapter_meta, check_method, read_json, task_facts
from peftbench.using.model import Model

#: what ``export`` writes (``peftbench.json``): its own version, independent of the adapter's
EXPORT_FORMAT_VERSION = 1
EXPORT_FORMATS = ("merged", "peft")
#: ``export --format safetensors``: the adapter alone (no base), an adapter folder ``load`` reads
ADAPTER_ONLY = "safetensors"
EXPORT_CHOICES = (*EXPORT_FORMATS, ADAPTER_ONLY)


def build_backbone(name: str, kind: str, num_labels: int, registry, device: torch.device):
    """The backbone as a trial loads it: the task's head, decoders padded on the left to classify."""
    from peftbench.backbones.backbone import load_backbone

    backbone = load_backbone(name, task="causal_lm" if kind == "generation" else "classification",
                             num_labels=max(num_labels, 1), registry=registry)
    if backbone.tokenizer is None:
        raise ConfigError(f"backbone {name!r} has no tokenizer")
    backbone.tokenizer.padding_side = "left" if backbone.spec.is_decoder and kind == "classification" else "right"
    return backbone


def check_backbone(meta: dict, backbone, source: Path) -> None:
    """Refuse a base other than the one the adapter trained on (its name may be the same)."""
    from peftbench.backbones.fingerprint import fingerprint

    recorded = meta.get("backbone_sha256")
    if not recorded:
        return
    actual = fingerprint(backbone)
    if actual != recorded:
        raise ConfigError(f"{source} was trained on backbone {meta['backbone']!r} with weights {recorded[:19]}..., "
                          f"but {backbone.name!r} loads with weights {actual[:19]}...: another base model")


def load_trial(found: Located, registry, device: torch.device, backbone_name: str | None = None) -> Model:
    from peftbench.contract.injection import load_injection

    from peftbench.using.named import DEFAULT, name_labels, stored_from_folder

    meta = adapter_meta(found.path)
    check_method(meta, found.path, registry)
    notes: list[str] = []
    facts = task_facts(meta, found, registry, notes)
    num_labels = meta.get("num_labels", len(facts["labels"]))
    if facts["kind"] == "classification" and num_labels != len(facts["labels"]):
        raise ConfigError(f"{found.path}: num_labels {num_labels} but {len(facts['labels'])} label names")
    backbone = build_backbone(backbone_name or meta["backbone"], facts["kind"], num_labels, registry, device)
    check_backbone(meta, backbone, found.path)
    injection = load_injection(backbone, found.path, registry)
    if facts["kind"] == "classification":
        name_labels(backbone.config, facts["labels"])
    backbone.model.to(device).eval()
    meta = {**meta, "trial_id": found.trial_id}
    return Model(backbone.model, backbone.tokenizer, facts["labels"], kind=facts["kind"],
                 max_length=facts["max_length"], device=device, source=str(found.path), meta=meta,
                 backbone=backbone, injection=injection, notes=notes, registry=registry,
                 adapters={DEFAULT: stored_from_folder(found.path, meta, facts, notes)}, active_adapter=DEFAULT)


def load_export(folder: Path, device: torch.device) -> Model:
    """A folder ``export`` wrote: a plain checkpoint (merged) or a peft adapter beside its base."""
    import transformers

    from peftbench.backbones.backbone import quiet_transformers
    from peftbench.backbones.quant import keep_one_format

    meta = read_json(folder / EXPORT_META, "peftbench export metadata")
    version, fmt = meta.get("export_format_version"), meta.get("export_format")
    if version != EXPORT_FORMAT_VERSION:
        raise ConfigError(f"{folder / EXPORT_META}: export_format_version {version!r} is unknown; this peftbench "
                          f"reads version {EXPORT_FORMAT_VERSION}")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"{folder / EXPORT_META}: export_format {fmt!r} is unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    kind = meta.get("task_kind", "classification")
    quiet_transformers()
    if fmt == "merged":
        auto = transformers.AutoModelForCausalLM if kind == "generation" else transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(folder)
    else:  # the base beside the adapter, wherever the folder is now (base_model_name_or_path may be stale)
        try:
            import peft
        except ImportError:
            raise ConfigError(f"{folder} is a peft export and peft is not installed: pip install peft") from None
        auto = transformers.AutoModelForCausalLM if kind == "generation" else transformers.AutoModelForSequenceClassification
        with warnings.catch_warnings():  # peft 0.21 calls a transformers API that warns of its own deprecation
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.PeftModel.from_pretrained(auto.from_pretrained(folder / "base"), folder)
    for module in model.modules():  # a 4-bit base computes as peftbench's 4-bit layers do, on any CPU
        keep_one_format(module)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model.to(device).eval()
    return Model(model, tokenizer, tuple(meta.get("labels", ())), kind=kind, max_length=int(meta.get("max_length", 128)),
                 device=device, source=str(folder), meta=meta)


def load(path: str | Path, method: str | None = None, budget: str | None = None, seed: int = 0, *,
         task: str | None = None, backbone: str | None = None, variant: str | None = None,
         device: str | torch.device = "cpu", registry=None) -> Model:
    """A ready ``Model`` from a suite folder (with ``method``; ``budget`` when the suite has several;
    ``seed`` default 0; ``task``/``backbone``/``variant`` when the suite has several), a trial folder,
    its ``adapter`` folder, or a folder ``export`` wrote. ``registry``: the plugins (default: installed)."""
    from peftbench.contract.registry import get_registry

    registry = registry if registry is not None else get_registry()
    device = torch.device(device)
    found = locate(path, method, budget=budget, seed=seed, task=task, backbone=backbone, variant=variant,
                   registry=registry)
    if found.export:
        return load_export(found.path, device)
    return load_trial(found, registry, device)
