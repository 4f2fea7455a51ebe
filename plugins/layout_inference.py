"""A layout inferred from a model's module names, for a ``model_type`` nobody registered.

Many families copy the module names of one they descend from: Granite, OLMo and StableLM
name their blocks exactly like LLaMA (``layers.N.self_attn.q_proj``, ``mlp.down_proj``),
CamemBERT and ERNIE like BERT (``encoder.layer.N.attention.self.query``). ``infer_layout``
builds the base model on the meta device (no weights), finds the list of
``num_hidden_layers`` blocks, and looks up each site among the names those conventions use
(``CANDIDATES``), taking the first that exists with the right kind of module. q, k, v (or a
fused q|k|v), the attention output and the FFN's input and output projections must be
found; the gate and the norms are taken when present. The key/value prefix site (the
module that calls the attention function) is offered only when transformers finds that the
model's attention goes through its attention-function registry (``_can_set_attn_implementation``),
which is the road the prefix takes.

Fused projections are matched only under names whose slices are stored one after another
(q|k|v, gate|up): GPT-NeoX's and BLOOM's ``query_key_value`` interleave heads, so they are
not guessed at and inference fails with the names it looked for.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import peftbench

#: site -> relative paths inside one block, most common first
CANDIDATES: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj", "attention.self.query", "attn.q_proj", "self_attention.q_proj", "attention.q_proj",
          "attention.q_lin"),
    "k": ("self_attn.k_proj", "attention.self.key", "attn.k_proj", "self_attention.k_proj", "attention.k_proj",
          "attention.k_lin"),
    "v": ("self_attn.v_proj", "attention.self.value", "attn.v_proj", "self_attention.v_proj", "attention.v_proj",
          "attention.v_lin"),
    "attn_out": ("self_attn.o_proj", "attention.output.dense", "attn.o_proj", "self_attn.out_proj", "attn.out_proj",
                 "self_attention.o_proj", "attention.o_proj", "attention.out_lin", "self_attention.dense",
                 "attn.c_proj"),
    "ffn_gate": ("mlp.gate_proj", "feed_forward.gate_proj"),
    "ffn_in": ("mlp.up_proj", "intermediate.dense", "mlp.c_fc", "mlp.fc1", "feed_forward.up_proj", "ffn.lin1",
               "mlp.dense_h_to_4h"),
    "ffn_out": ("mlp.down_proj", "output.dense", "mlp.c_proj", "mlp.fc2", "feed_forward.down_proj", "ffn.lin2",
                "mlp.dense_4h_to_h"),
    "attn_norm": ("input_layernorm", "attention.output.LayerNorm", "ln_1", "sa_layer_norm"),
    # Gemma-2-style blocks normalise the attention's output too: the norm in front of the FFN comes first
    "ffn_norm": ("pre_feedforward_layernorm", "post_attention_layernorm", "output.LayerNorm", "ln_2",
                 "output_layer_norm"),
}
#: fused projection path -> its slices, stored one after another
FUSED: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q", "k", "v"),
    "attn.c_attn": ("q", "k", "v"),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_in"),
}
REQUIRED = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
#: attention-norm names that sit in front of the attention (pre-norm blocks)
PRE_NORMS = ("input_layernorm", "ln_1")

_CACHE: dict[tuple[str, str], peftbench.ArchLayout] = {}
_WARNED: set[str] = set()


def _fail(model_type: str, what: str) -> peftbench.LayoutError:
    return peftbench.LayoutError(
        f"cannot infer a layout for model_type {model_type!r}: {what}; register a peftbench.ArchLayout for it"
    )


def _is_linear(module) -> bool:
    try:
        peftbench.linear_shape(module)
    except peftbench.LayoutError:
        return False
    return True


def _base_model(config) -> nn.Module:
    import transformers

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise _fail(model_type, "it is an encoder-decoder model (only encoders and decoders have layouts)")
    try:
        with torch.device("meta"):
            return transformers.AutoModel.from_config(copy.deepcopy(config))
    except Exception as exc:  # transformers has no model class for this config, or cannot build it
        raise _fail(model_type, f"transformers cannot build its model ({type(exc).__name__}: {exc})") from exc


def _blocks(model: nn.Module, config, model_type: str) -> list[tuple[str, nn.Module]]:
    """(path, first block) of each ModuleList with one entry per hidden layer."""
    layers = getattr(config, "num_hidden_layers", None)
    found = [(name, m[0]) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and (layers is None or len(m) == layers)]
    if not found:
        raise _fail(model_type, f"no list of {layers} blocks (num_hidden_layers) in {type(model).__name__}")
    return found


def _match(block: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(sites, fused) of one block: the first candidate path of each site that holds the right module."""
    modules = dict(block.named_modules())
    sites, fused = {}, {}
    for path, parts in FUSED.items():
        if path in modules and _is_linear(modules[path]):
            fused[path] = parts
    taken = {p for parts in fused.values() for p in parts}
    for name, paths in CANDIDATES.items():
        if name in taken:
            continue
        for path in paths:
            module = modules.get(path)
            if module is None:
                continue
            if name.endswith("_norm") or _is_linear(module):
                sites[name] = path
                break
    return sites, fused


def infer_layout(config) -> peftbench.ArchLayout:
    """An ``ArchLayout`` for ``config`` from its model's module names; a one-line LayoutError
    naming the model type and what was not found when the names follow no known convention."""
    model_type = getattr(config, "model_type", None) or type(config).__name__
    key = (model_type, config.to_json_string(use_diff=False))
    if key in _CACHE:
        return _CACHE[key]
    model = _base_model(config)
    best = None
    for layers_path, block in _blocks(model, config, model_type):
        sites, fused = _match(block)
        have = set(sites) | {p for parts in fused.values() for p in parts}
        missing = [s for s in REQUIRED if s not in have]
        if best is None or len(missing) < len(best[3]):
            best = (layers_path, sites, fused, missing, block)
    layers_path, sites, fused, missing, block = best
    if missing:
        children = ", ".join(n for n, _ in block.named_children())
        looked = "; ".join(f"{s}: {', '.join(CANDIDATES[s])}" for s in missing)
        raise _fail(model_type, f"the blocks at {layers_path!r} (children: {children}) have no module for "
                                f"{', '.join(missing)} under the usual names ({looked})")
    q_path = sites.get("q") or next(p for p, parts in fused.items() if "q" in parts)
    absent = {}
    if _calls_attention_registry(model) and "." in q_path:
        sites["attention"] = q_path.rpartition(".")[0]
    else:
        absent["attention"] = (f"{type(model).__name__}'s attention does not call transformers' attention-function "
                               f"registry, so no key/value prefix can reach it")
    layout = peftbench.ArchLayout(
        model_type=model_type,
        layers=layers_path,
        sites=sites,
        embeddings=_embeddings_path(model, model_type),
        fused=fused,
        pre_norm=sites.get("attn_norm") in PRE_NORMS,
        causal=_is_causal(config),
        absent=absent,
    )
    _CACHE[key] = layout
    return layout


def _calls_attention_registry(model: nn.Module) -> bool:
    """transformers' own test of whether a model's attention goes through ``ALL_ATTENTION_FUNCTIONS``
    (what ``set_attn_implementation`` needs to take effect)."""
    check = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(check is not None and check())


def _embeddings_path(model: nn.Module, model_type: str) -> str:
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings and name:
            return name
    raise _fail(model_type, f"its input embeddings are not a module of {type(model).__name__}")


def _is_causal(config) -> bool:
    """Decoder-only: transformers has a causal-LM class for it and no masked-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = type(config)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_MASKED_LM_MAPPING


def describe(layout: peftbench.ArchLayout) -> str:
    """The inferred paths in one line (for the warning)."""
    names = [f"{n}={p}" for n, p in layout.sites.items() if n in ("q", "attn_out", "ffn_in", "ffn_out")]
    names += [f"{'|'.join(parts)}={p}" for p, parts in layout.fused.items()]
    return f"blocks {layout.layers}.N, " + ", ".join(names)


@peftbench.hookimpl(trylast=True)
def resolve_layout(config):
    """Infer a layout for an unregistered model type (after every other plugin's answer)."""
    layout = infer_layout(config)
    if layout.model_type not in _WARNED:
        _WARNED.add(layout.model_type)
        print(f"peftbench: warning: no layout is registered for model_type {layout.model_type!r}; using one "
              f"inferred from its module names ({describe(layout)})", file=sys.stderr)
    return layout
