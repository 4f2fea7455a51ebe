"""Prefix tuning (Li & Liang 2021): n trained key/value vectors in front of every attention layer.

During training the prefix is reparameterised by an MLP (the paper found direct training
unstable)::

    P = Linear(b, 2·L·kv_dim)(tanh(Linear(d, b)(E)))      E: (n, d) trained embeddings

and reshaped to (L, 2, kv_heads, n, head_dim). ``finalize()`` evaluates the MLP once and keeps
only that tensor (the MLP is dropped), which is what is saved and used for inference. With
``reparameterize: false`` the flat tensor is trained directly (what P-tuning v2 does).

The prefix reaches the attention through the core's key/value-prefix mechanism
(``Injection.kv_prefix``): it is not placed in the KV cache, so generation with a cache and
position ids of real tokens are unaffected. The MLP runs once per forward (not once per
layer): a pre-hook on the base model computes all L layers' prefixes before the first layer,
outside any layer's gradient-checkpointing region, and splits the table once into its 2·L
key and value views (one ``unbind``, whose backward is one ``stack``; per-layer indexing
would cost 2·L full-size zero tensors and adds in backward); every layer reads its pair.
Without gradients (evaluation, inference, the flattened table) the split table is cached
until a parameter changes (in place, on another device, or replaced).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

import peftbench


class PrefixTable(nn.Module):
    """The per-layer keys and values: a (L, 2, kv_heads, n, head_dim) tensor, or an MLP that makes it.
    ``layers``: the backbone layers it feeds (default all); L is their number, row j feeds ``layers[j]``."""

    def __init__(self, spec: peftbench.BackboneSpec, n: int, hidden: int | None, layers: list[int] | None = None):
        super().__init__()
        self.layers = list(range(spec.layers)) if layers is None else list(layers)
        self.rows = {layer: j for j, layer in enumerate(self.layers)}  # backbone layer -> row of the table
        self.shape = (len(self.layers), 2, spec.kv_heads, n, spec.head_dim)
        if hidden is None:
            self.prefix = nn.Parameter(torch.randn(self.shape))
        else:
            self.embedding = nn.Parameter(torch.randn(n, spec.hidden))
            out = 2 * len(self.layers) * spec.kv_dim
            self.mlp = nn.Sequential(nn.Linear(spec.hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))
        self._clear()

    def _clear(self) -> None:
        """Drop this forward's split table and the gradient-free cache (plain attributes, never
        registered as parameters or buffers)."""
        self.__dict__["_current"] = None  # this forward's 2·L key/value views
        self.__dict__["_cached"] = None  # (parameter state, views, parameters) of the last gradient-free split

    @property
    def reparameterized(self) -> bool:
        return "mlp" in self._modules

    def forward(self) -> torch.Tensor:
        if not self.reparameterized:
            return self.prefix
        layers, _, kv_heads, n, head_dim = self.shape
        flat = self.mlp(self.embedding)  # (n, L·2·kv_dim)
        return flat.view(n, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)  # (L, 2, kv_heads, n, head_dim)

    def split(self) -> tuple[torch.Tensor, ...]:
        """The table as 2·L views (layer i: key 2i, value 2i + 1), each (kv_heads, n, head_dim)."""
        layers, _, kv_heads, n, head_dim = self.shape
        if torch.is_grad_enabled():
            return self().reshape(2 * layers, kv_heads, n, head_dim).unbind(0)
        state = (torch.is_inference_mode_enabled(), *((id(p), p._version, p.data_ptr()) for p in self.parameters()))
        cached = self._cached
        if cached is None or cached[0] != state:
            parts = self().reshape(2 * layers, kv_heads, n, head_dim).unbind(0)
            # the parameters are held too, so their ids cannot be reused while the entry lives
            cached = self.__dict__["_cached"] = (state, parts, list(self.parameters()))
        return cached[1]

    def key_value(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The core's provider: this layer's (kv_heads, n, head_dim) key and value."""
        if self._current is None:  # a layer called outside a base-model forward
            self.__dict__["_current"] = self.split()
        row = self.rows[layer]
        return self._current[2 * row], self._current[2 * row + 1]

    def new_forward(self, *_args) -> None:
        """Build this forward's split table (a new autograd graph each forward while training).
        It is kept until the next forward, so gradient checkpointing re-runs layers on the very
        same tensors."""
        self.__dict__["_current"] = self.split()

    @torch.no_grad()
    def flatten(self) -> None:
        """Evaluate the MLP once and keep only its output as the trained tensor."""
        if not self.reparameterized:
            return
        table = self().contiguous().clone()
        del self.mlp, self.embedding
        self.prefix = nn.Parameter(table)
        self._clear()


def attach_prefix(injection: peftbench.Injection, table: PrefixTable) -> PrefixTable:
    """Hang ``table`` on the base model and feed it to every attention layer."""
    base = injection.backbone.base_model
    table.to(injection.backbone.embeddings().weight.device)
    # the prefix path first: where a family's attention cannot take one it refuses, and nothing is attached yet
    injection.kv_prefix(table.key_value, table.layers)
    injection.attach(base, "prefix", table)
    injection.add_hook(base, table.new_forward, pre=True)  # one table per base-model forward
    injection.on_remove(lambda: table._clear())
    return table


def kv_prefix_knob_range(spec: peftbench.BackboneSpec) -> tuple[int, int]:
    """Prefix lengths 1 .. the model's context length."""
    return 1, spec.max_positions


class PrefixInjection(peftbench.Injection):
    table: PrefixTable

    def finalize(self) -> None:
        self.table.flatten()
        super().finalize()


class Prefix(peftbench.Method):
    name = "prefix"
    aliases = ("prefix-tuning", "prefix_tuning")
    knob = "n"
    inserts = "n trained key/value vectors per attention layer (MLP-reparameterised while training)"
    default_lr = 5e-3

    per_layer_sizes = False  # one prefix length in every chosen layer (``layers``)

    class Config(peftbench.PerLayerConfig):
        n: int = Field(10, ge=1, description="virtual tokens (prefix length)")
        hidden: int | None = Field(None, ge=1, description="MLP width b; default min(512, hidden size)")
        reparameterize: bool = Field(True, description="produce the prefix by an MLP while training (dropped after)")

    #: the reparameterisation MLP's width b: at a small budget the solver narrows it (the MLP is
    #: d·b + b·2·L·kv_dim parameters, 8.5% of MiniLM at b = 384) so that the prefix length n fits
    secondary = "hidden"

    def secondary_values(self, cfg, spec):
        # every width below the default, largest first (the solver keeps the first that fits)
        return list(range(min(512, spec.hidden) - 1, 0, -1)) if cfg.reparameterize else []

    def mlp_width(self, cfg, spec: peftbench.BackboneSpec) -> int | None:
        if not cfg.reparameterize:
            return None
        return cfg.hidden if cfg.hidden is not None else min(512, spec.hidden)

    def knob_range(self, cfg, spec):
        return kv_prefix_knob_range(spec)

    def param_count(self, cfg, spec):
        b = self.mlp_width(cfg, spec)
        if b is None:
            return self.stored_count(cfg, spec)
        # n·d (embeddings) + d·b + b (first linear) + b·(2·L·kv_dim) + 2·L·kv_dim (second linear), L chosen layers
        out = 2 * len(self.layer_indices(cfg, spec)) * spec.kv_dim
        return cfg.n * spec.hidden + spec.hidden * b + b + b * out + out

    def stored_count(self, cfg, spec):
        # after finalize(): L · 2 · n · kv_dim (kv_dim = kv_heads · head_dim), L chosen layers
        return len(self.layer_indices(cfg, spec)) * 2 * cfg.n * spec.kv_dim

    def inject(self, backbone, cfg):
        injection = PrefixInjection(backbone, self, cfg)
        table = PrefixTable(backbone.spec, cfg.n, self.mlp_width(cfg, backbone.spec),
                            self.layer_indices(cfg, backbone.spec))
        injection.table = attach_prefix(injection, table)
        return injection


@peftbench.hookimpl
def register_methods(register):
    register(Prefix)
