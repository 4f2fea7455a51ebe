"""ArchLayout: where a model family keeps its insertion sites, as dotted paths.

Paths are relative to the HF *base model* (``model.base_model``: ``BertModel``,
``GPT2Model``, ``LlamaModel``) for ``layers`` and ``embeddings``, and relative to one block
for per-layer ``sites``. A fused projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` and
``gate_up_proj``) names its output slices: q takes ``heads * head_dim`` outputs and k and v
``kv_heads * head_dim`` each (so GQA's narrower k/v slices come out right); any other slices
split the rest equally.
Standard site names: q, k, v, attn_out, ffn_in, ffn_gate, ffn_out, attn_norm, ffn_norm,
and ``attention`` (the module that calls the attention function: the key/value prefix site).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from peftbench.errors import LayoutError

SITE_NAMES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_gate", "ffn_out", "attn_norm", "ffn_norm", "attention")
LINEAR_SITES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_gate", "ffn_out")


@dataclass(frozen=True)
class ArchLayout:
    model_type: str
    layers: str
    sites: Mapping[str, str]
    embeddings: str
    #: fused projection path -> the site names of its equal output slices, in order
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: config attribute names, when they differ from the usual ones
    config_names: Mapping[str, str] = field(default_factory=dict)
    #: True when LayerNorm comes before each sub-layer (GPT-2, LLaMA)
    pre_norm: bool = False
    #: True for decoder-only families (causal self-attention)
    causal: bool = False
    #: standard sites this family cannot offer -> why (named in the error when a method asks)
    absent: Mapping[str, str] = field(default_factory=dict)
    #: for a family whose attention module never calls transformers' attention-function registry (DeBERTa):
    #: ``prefix_attention(module) -> undo`` makes that module put key/value prefixes in front of its own keys
    #: and values, asking ``peftbench.kv_prefix_for(module, key)`` for them on every call; None: the registry
    prefix_attention: Callable[[nn.Module], Callable[[], None]] | None = None

    def site_names(self) -> list[str]:
        names = list(self.sites)
        for parts in self.fused.values():
            names.extend(parts)
        return names

    def fused_path(self, name: str) -> tuple[str, int, int] | None:
        """(path, index, count) when ``name`` is a slice of a fused projection."""
        for path, parts in self.fused.items():
            if name in parts:
                return path, parts.index(name), len(parts)
        return None


@dataclass
class Site:
    """A resolved site of one layer: the module, and for fused projections the output slice.

    ``module`` is what sits there now (a Linear, Conv1D, LayerNorm, attention module, or a wrapper
    another method put there, whose ``base_layer`` is the original); ``parent.<attr>`` is where it is
    held, for ``Injection.replace(site.parent, site.attr, new)``."""

    #: index of the transformer block (0 = closest to the embeddings)
    layer: int
    #: the layout's site name: q, k, v, attn_out, ffn_in, ffn_gate, ffn_out, attn_norm, ffn_norm, attention
    name: str
    path: str  # dotted, relative to the full model
    module: nn.Module = field(repr=False)
    parent: nn.Module = field(repr=False)
    attr: str
    #: for a slice of a fused projection (GPT-2's ``c_attn`` computes q|k|v in one Conv1D): the
    #: (start, end) output columns that are this site's; ``module`` is the whole fused projection,
    #: so a method must add its update to these columns only (``h[..., start:end]``). None: the
    #: module's whole output is the site's
    out_slice: tuple[int, int] | None = None

    @property
    def in_features(self) -> int:
        """Input width of the site's linear module (through a wrapper's ``base_layer``)."""
        return linear_shape(self.module)[0]

    @property
    def out_features(self) -> int:
        """Output width of the site: its slice's width for a fused slice, else the module's."""
        if self.out_slice is not None:
            return self.out_slice[1] - self.out_slice[0]
        return linear_shape(self.module)[1]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a Conv1D, or a wrapper with ``base_layer``."""
    base = getattr(module, "base_layer", None)
    if base is not None:
        return linear_shape(base)
    if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return int(module.in_features), int(module.out_features)
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    raise LayoutError(f"{type(module).__name__} is not a linear layer")


def get_path(root: nn.Module, path: str, what: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not part:
            continue
        if not hasattr(module, part):
            raise LayoutError(
                f"layout path {path!r} ({what}) matches nothing in {type(root).__name__}: "
                f"{type(module).__name__} has no {part!r}; children: {', '.join(n for n, _ in module.named_children())}"
            )
        module = getattr(module, part)
    return module


def split_parent(root: nn.Module, path: str, what: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = get_path(root, parent_path, what) if parent_path else root
    if not hasattr(parent, attr):
        raise LayoutError(f"layout path {path!r} ({what}) matches nothing in {type(root).__name__}")
    return parent, attr


def slice_bounds(layout: ArchLayout, path: str, parts: tuple[str, ...], out_features: int,
                 widths: Mapping[str, int] | None) -> list[tuple[int, int]]:
    """(start, stop) of each output slice of a fused projection with ``out_features`` outputs.

    Slices named in ``widths`` (the backbone gives q, k and v theirs) take that width; the
    others split what is left equally. A projection whose width does not add up is an error.
    """
    widths = widths or {}
    known = sum(widths[p] for p in parts if p in widths)
    rest = [p for p in parts if p not in widths]
    share, left = divmod(out_features - known, len(rest)) if rest else (0, out_features - known)
    if left or share < 0 or (rest and share == 0):
        want = " + ".join(f"{p}={widths[p]}" if p in widths else f"{p}=?" for p in parts)
        raise LayoutError(f"fused projection {path!r} of {layout.model_type!r} has {out_features} outputs, "
                          f"which its slices ({want}) cannot split")
    bounds, start = [], 0
    for part in parts:
        width = widths.get(part, share)
        bounds.append((start, start + width))
        start += width
    return bounds


def resolve_site(layout: ArchLayout, block: nn.Module, layer: int, name: str, block_path: str,
                 widths: Mapping[str, int] | None = None) -> Site:
    """The site ``name`` of ``block`` (layer ``layer``); ``widths`` sizes fused q/k/v slices."""
    if name in layout.sites:
        path = layout.sites[name]
        parent, attr = split_parent(block, path, f"site {name!r} of {layout.model_type}")
        return Site(layer, name, f"{block_path}.{path}", getattr(parent, attr), parent, attr)
    fused = layout.fused_path(name)
    if fused is not None:
        path, index, _ = fused
        parent, attr = split_parent(block, path, f"fused site {name!r} of {layout.model_type}")
        module = getattr(parent, attr)
        bounds = slice_bounds(layout, path, layout.fused[path], linear_shape(module)[1], widths)
        return Site(layer, name, f"{block_path}.{path}", module, parent, attr, bounds[index])
    why = f" ({layout.absent[name]})" if name in layout.absent else ""
    raise LayoutError(
        f"architecture {layout.model_type!r} has no site {name!r}{why}; it has: {', '.join(layout.site_names())}"
    )
