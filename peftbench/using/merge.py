"""Folding a mergeable adapter into its backbone: a plain transformers model of the backbone's class,
the labels in its config (``Model.merge_and_unload``, ``export --format merged``); and the base a peft
export sits on (``export --format peft``): plain, or with its 4-bit layers as the method ran them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftbench.backbones.quant import is_4bit
from peftbench.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.using.model import Model


def auto_class(kind: str):
    import transformers

    return transformers.AutoModelForCausalLM if kind == "generation" else transformers.AutoModelForSequenceClassification


def plain_state(model: torch.nn.Module, plain_keys: list[str]) -> dict[str, torch.Tensor]:
    """The injected model's tensors under a plain model's names: a replaced module keeps the original
    as ``base_layer``, so ``x.base_layer.weight`` is the plain ``x.weight``; the method's own are left."""
    state = {}
    for name, tensor in model.state_dict().items():
        plain = name.replace(".base_layer.", ".")
        if plain in plain_keys and (plain == name or plain not in state):
            state[plain] = tensor.detach().to("cpu").clone()
    return state


def labelled_config(model: "Model"):
    """A copy of the backbone's transformers config; a classifier's names its labels."""
    config = copy.deepcopy(model.model.config)
    if model.kind == "classification":
        config.id2label = dict(enumerate(model.labels))
        config.label2id = {label: i for i, label in enumerate(model.labels)}
    return config


def plain_model(model: "Model") -> torch.nn.Module:
    """A new transformers model of the backbone's class holding the injected model's base weights
    (merged, if the caller merged), the head included; its config names the labels."""
    config = labelled_config(model)
    plain = auto_class(model.kind).from_config(config)
    keys = list(plain.state_dict())
    state = plain_state(model.model, keys)
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ConfigError(f"the injected model has no plain tensor for {missing[:5]}: cannot rebuild the backbone")
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def merged_model(model: "Model") -> torch.nn.Module:
    """A plain transformers model with the active adapter folded into its weights (``Method.mergeable``);
    ``model`` itself is left as it was."""
    if model.injection is None:
        raise ConfigError(f"merging needs a model loaded from a trial with an active adapter; {model.source} has none")
    method = model.injection.method
    if not method.mergeable:
        raise ConfigError(f"method {method.name!r} cannot merge into the backbone's weights (it keeps its own "
                          f"modules or hooks): export it with --format peft where peft has it, else use peftbench.load")
    model.injection.merge()
    try:
        return plain_model(model).to(model.device)
    finally:
        model.injection.unmerge()


def save_quantized_base(model: "Model", quantization: dict, folder: Path) -> None:
    """Save the injected model's base as it runs when a method quantised its layers (4-bit): the other
    tensors under the plain model's names, every 4-bit layer in bitsandbytes' own serialization (packed
    weight, block statistics, code) under its plain path, and ``quantization`` as the config's
    ``quantization_config``, so transformers loads these very weights (nothing is quantised again)."""
    from safetensors.torch import save_file

    config = labelled_config(model)
    with torch.device("meta"):  # only the names of the plain model's tensors
        keys = list(auto_class(model.kind).from_config(copy.deepcopy(config)).state_dict())
    state = plain_state(model.model, keys)
    for path, module in model.model.named_modules():
        if is_4bit(module):
            for name, tensor in module.state_dict().items():  # weight, bias, weight.absmax, weight.quant_map, ...
                state[f"{path}.{name}".replace(".base_layer.", ".")] = tensor.detach().to("cpu").contiguous().clone()
    missing = sorted(set(keys) - set(state))
    if missing:
        raise ConfigError(f"the injected model has no tensor for {missing[:5]}: cannot rebuild the backbone")
    config.quantization_config = dict(quantization)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
