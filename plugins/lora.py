"""LoRA (Hu et al., 2021): a trainable low-rank update beside frozen linear layers.

    h = W x + (alpha / r) * B A x        A: (r, d_in) kaiming-uniform, B: (d_out, r) zero

so the model is unchanged at initialisation. Each target linear site is replaced by a
``LoRALinear`` that keeps the original as ``base_layer``. On GPT-2's fused ``c_attn``
(a Conv1D producing q|k|v) the targets are output slices: every targeted slice of one
fused module shares one ``SlicedLoRALinear`` and its delta lands only in its slice.
"""

from __future__ import annotations

import math
from typing import Literal

import peftbench
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer (Linear, Conv1D or 4-bit) plus (alpha / r) * B A.

    Where it can (see ``_can_fuse``) the forward is one fused autograd node (``_FusedLoRA``);
    elsewhere (4-bit bases, LoRA dropout while training, autocast, mixed dtypes, a trained
    base) it is the module path. ``fused = False`` (on the class or one instance) forces the
    module path.
    """

    fused: bool = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 slices: list[tuple[int, int]] | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        d_in, d_out = peftbench.linear_shape(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        #: output columns each LoRA writes, as (start, end); None: the whole output
        self.slices = slices
        n = len(slices) if slices else 1
        width = (slices[0][1] - slices[0][0]) if slices else d_out
        weight = _floating_weight(base_layer)
        factory = {"device": weight.device if weight is not None else None,
                   "dtype": dtype or (weight.dtype if weight is not None else None)}
        # with slices, A and B of slice i are rows i*r:(i+1)*r of A and i*w:(i+1)*w of B
        self.lora_A = nn.Linear(d_in, n * r, bias=False, **factory)  # weight (n*r, d_in)
        self.lora_B = nn.Linear(r, n * width, bias=False, **factory)  # weight (n*w, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # bound 1/sqrt(d_in), as peft
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self._unmerged: list[nn.Parameter] = []  # the original weight while merged (a list: not registered)
        # bases the fused function handles: a plain float nn.Linear (not a subclass such as 4-bit) or Conv1D
        self._base_type = type(base_layer)
        plain = not peftbench.quant.is_4bit(base_layer) and weight is not None and weight.is_floating_point()
        self._base_kind = ("linear" if type(base_layer) is nn.Linear else
                           "conv1d" if peftbench.is_conv1d(base_layer) else None) if plain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._can_fuse(x):
            return self._fused(x)
        # h = W x + B (alpha / r) A x   (the scaling multiplies the r-wide A x: the cheap place)
        return self.base_layer(x) + self.lora_B(self.scaling * self.lora_A(self.dropout(x)))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused forward: one autograd node when a gradient is wanted, else ``_lora_no_grad``."""
        args = (x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                self.scaling, self.slices, self._base_kind == "conv1d")
        if torch.is_grad_enabled() and (x.requires_grad or self.lora_A.weight.requires_grad
                                        or self.lora_B.weight.requires_grad):
            return _FusedLoRA.apply(*args)
        return _lora_no_grad(*args)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """The fused function computes what the module path does (up to float rounding: the
        same sums in another order); it is used when the base is a plain float Linear or Conv1D
        without hooks, frozen (no gradient for W, b), A and B plain ``nn.Linear`` (not replaced by
        quantised ones), the LoRA input is x itself (no dropout
        while training), autocast is off and x, W, A, B share one dtype."""
        base = self.base_layer
        if not self.fused or self._base_kind is None or type(base) is not self._base_type:
            return False
        if type(self.lora_A) is not nn.Linear or type(self.lora_B) is not nn.Linear:  # e.g. int8-quantised
            return False
        if self.training and isinstance(self.dropout, nn.Dropout):
            return False
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if base._forward_hooks or base._forward_pre_hooks or self.lora_A._forward_hooks or \
                self.lora_A._forward_pre_hooks or self.lora_B._forward_hooks or self.lora_B._forward_pre_hooks:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        dtype = x.dtype
        return weight.dtype == dtype and self.lora_A.weight.dtype == dtype and self.lora_B.weight.dtype == dtype

    # -- merging -------------------------------------------------------------------------
    def delta_weights(self) -> list[tuple[int, int, torch.Tensor]]:
        """(start, end, (alpha / r) * B_i A_i of shape (end - start, d_in)) per slice."""
        a, b, r = self.lora_A.weight, self.lora_B.weight, self.r
        slices = self.slices or [(0, b.shape[0])]
        width = slices[0][1] - slices[0][0]
        return [(s, e, self.scaling * (b[i * width:(i + 1) * width] @ a[i * r:(i + 1) * r]))
                for i, (s, e) in enumerate(slices)]

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A in a new weight; the original is kept for ``unmerge``."""
        if self.merged:
            return
        base = self.base_layer
        four_bit = peftbench.quant.is_4bit(base)
        dense = peftbench.quant.dequantize_weight(base) if four_bit else base.weight.detach().clone()
        rows = dense.T if peftbench.is_conv1d(base) else dense  # (d_out, d_in) view either way
        for start, end, delta in self.delta_weights():
            rows[start:end] += delta.to(rows.dtype)
        self._unmerged = [base.weight]
        if four_bit:  # requantised: merged 4-bit outputs carry a second rounding error
            base.weight = peftbench.quant.requantize(base, dense)
        else:
            base.weight = nn.Parameter(dense, requires_grad=base.weight.requires_grad)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original weight object back (bit for bit)."""
        if not self.merged:
            return
        self.base_layer.weight = self._unmerged.pop()
        self.merged = False


class SlicedLoRALinear(LoRALinear):
    """LoRA on some output slices of a fused projection (GPT-2's q|k|v ``c_attn``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._can_fuse(x):
            return self._fused(x)
        h = self.base_layer(x)  # (..., d_out): every slice
        ax = self.lora_A(self.dropout(x)) * self.scaling  # (..., n*r): all slices' (alpha/r) A_i x in one matmul
        b, r = self.lora_B.weight, self.r
        pieces, done = [], 0  # h rebuilt once, left to right; untargeted columns pass through
        for i, (start, end) in enumerate(self.slices):
            # h[..., slice i] + B_i (alpha / r) A_i x
            delta = F.linear(ax[..., i * r:(i + 1) * r], b[i * (end - start):(i + 1) * (end - start)])
            pieces += [h[..., done:start], h[..., start:end] + delta]
            done = end
        pieces.append(h[..., done:])
        return torch.cat(pieces, dim=-1)


def _lora_no_grad(x, weight, bias, lora_a, lora_b, scaling, slices, conv1d):
    """y = x W^T + b + s (x A^T) B^T without autograd (evaluation, inference).

    Nothing is kept for a backward pass, so the r-wide product is computed in the (N, r)
    layout, which runs faster than ``_FusedLoRA``'s (r, N) in a forward alone (that layout pays
    off in backward), and s is applied as the ``alpha`` of the addmm that adds the update into
    the base output in place.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (N, d_in)
    if conv1d:
        out = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
    else:
        out = F.linear(x2, weight, bias)  # (N, d_out)
    ax = F.linear(x2, lora_a)  # (N, n r): A_i x of every slice in one matmul
    if slices is None:
        out.addmm_(ax, lora_b.t(), alpha=scaling)
    else:
        r = ax.shape[1] // len(slices)
        for i, (start, end) in enumerate(slices):
            w = end - start
            out[:, start:end].addmm_(ax[:, i * r:(i + 1) * r], lora_b[i * w:(i + 1) * w].t(), alpha=scaling)
    return out.view(*shape[:-1], out.shape[-1])


class _FusedLoRA(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W, b frozen, as one autograd node.

    Against the module path (base, A, B, a scale and an add, each a node) it saves the
    (N, d_out) add in forward (the update is accumulated into the base output in place), the
    (N, d_in) add of the two input gradients in backward (accumulated likewise), the r-wide
    scale nodes and four module calls. It keeps what the module path keeps: x, W, A, B and
    s x A^T. Backward: g_B = g^T (s x A^T), g_A = s (g B)^T x, g_x = g W + s (g B) A.
    The r-wide products are computed transposed, (r, N): on CPU BLAS the skinny (N, r) layout
    runs about half as fast. ``slices`` (fused q|k|v): slice i adds s (x A_i^T) B_i^T to its
    columns only. ``conv1d``: W is stored (d_in, d_out) (GPT-2's Conv1D).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, slices, conv1d):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, d_in)
        sax_t = torch.mm(lora_a, x2.t()).mul_(scaling)  # (n r, N): s A_i x of every slice in one matmul
        if conv1d:
            out = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
        else:
            out = F.linear(x2, weight, bias)  # (N, d_out)
        if slices is None:
            out.addmm_(sax_t.t(), lora_b.t().contiguous())
        else:
            r = sax_t.shape[0] // len(slices)
            for i, (start, end) in enumerate(slices):
                w = end - start
                out[:, start:end].addmm_(sax_t[i * r:(i + 1) * r].t(), lora_b[i * w:(i + 1) * w].t().contiguous())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, sax_t)
        ctx.slices, ctx.conv1d, ctx.scaling, ctx.shape = slices, conv1d, scaling, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, sax_t = ctx.saved_tensors
        slices = ctx.slices
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_x = grad_a = grad_b = None
        need_gsax = need_x or need_a
        if slices is None:
            gsax_t = torch.mm(lora_b.t().contiguous(), g.t()) if need_gsax else None  # (r, N) = (g B)^T
            if need_b:
                grad_b = torch.mm(sax_t, g).t()  # (d_out, r) = g^T (s x A^T)
        else:
            r = sax_t.shape[0] // len(slices)
            pieces_a, pieces_b = [], []
            for i, (start, end) in enumerate(slices):
                w = end - start
                gi = g[:, start:end]  # (N, w): slice i's columns
                if need_gsax:
                    pieces_a.append(torch.mm(lora_b[i * w:(i + 1) * w].t().contiguous(), gi.t()))  # (r, N)
                if need_b:
                    pieces_b.append(torch.mm(sax_t[i * r:(i + 1) * r], gi).t())  # (w, r)
            gsax_t = torch.cat(pieces_a, dim=0) if pieces_a else None  # (n r, N)
            grad_b = torch.cat(pieces_b, dim=0) if pieces_b else None  # (n w, r)
        if gsax_t is not None:
            gsax_t.mul_(ctx.scaling)  # d loss / d (A x), transposed
        if need_a:
            grad_a = torch.mm(gsax_t, x2)  # (n r, d_in)
        if need_x:
            grad_x = torch.mm(g, weight.t()) if ctx.conv1d else torch.mm(g, weight)  # (N, d_in)
            grad_x.addmm_(gsax_t.t(), lora_a)
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _floating_weight(module: nn.Module) -> torch.Tensor | None:
    """A floating-point parameter of ``module`` (4-bit layers: the bias), for device and dtype."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return next(module.parameters(), None)


class LoRAInjection(peftbench.Injection):
    """Tracks the LoRA wrappers so the whole injection can merge and unmerge."""

    def __init__(self, backbone, method, cfg):
        super().__init__(backbone, method, cfg)
        self.lora_layers: list[LoRALinear] = []

    def merge(self) -> None:
        for layer in self.lora_layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.lora_layers:
            layer.unmerge()


# -- targets -------------------------------------------------------------------------------
ALL_LINEAR = "all-linear"


def target_names(method: str, targets: list[str] | str, spec: peftbench.BackboneSpec) -> list[str]:
    """The linear site names ``targets`` means on ``spec`` (``all-linear``: every one it has)."""
    if targets == ALL_LINEAR:
        return [n for n in peftbench.LINEAR_SITES if n in spec.site_shapes]
    missing = [n for n in targets if n not in spec.site_shapes]
    if missing:
        raise peftbench.ConfigError(
            f"method {method!r}: field 'targets' names {missing}, which {spec.name} ({spec.model_type}) lacks; "
            f"it has: {', '.join(n for n in peftbench.LINEAR_SITES if n in spec.site_shapes)} (or {ALL_LINEAR!r})"
        )
    return list(targets)


def validate_targets(value):
    """Accept 'all-linear', a list of linear site names, or a comma-separated string of them."""
    if isinstance(value, str) and value != ALL_LINEAR:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        bad = [v for v in value if v not in peftbench.LINEAR_SITES]
        if bad or not value:
            raise ValueError(f"targets must be {ALL_LINEAR!r} or linear site names from "
                             f"{', '.join(peftbench.LINEAR_SITES)}; got {value}")
        value = list(dict.fromkeys(value))  # drop repeats, keep order
    return value


def lora_params(r: int | dict[int, int], names: list[str], spec: peftbench.BackboneSpec) -> int:
    """LoRA's parameters with rank ``r`` in every layer, or ``{layer: rank}`` in those layers only."""
    # per layer and target: r * (d_in + d_out)   (GQA k/v: d_out = kv_heads * head_dim)
    ranks = dict.fromkeys(range(spec.layers), r) if isinstance(r, int) else r
    return sum(ranks.values()) * sum(spec.site_shapes[n][0] + spec.site_shapes[n][1] for n in names)


def max_rank(names: list[str], spec: peftbench.BackboneSpec) -> int:
    return min(min(spec.site_shapes[n]) for n in names)


def add_lora(injection: LoRAInjection, names: list[str], r: int | dict[int, int], alpha: float, dropout: float,
             dtype: torch.dtype | None = None) -> list[LoRALinear]:
    """Wrap the target sites of every layer (``r`` an int) or of the layers in ``r`` (``{layer: rank}``),
    each at its layer's rank; slices of one fused module share one wrapper."""
    ranks = r if isinstance(r, dict) else None
    groups: dict[int, list[peftbench.Site]] = {}
    for name in names:
        for site in injection.backbone.sites(name):
            if ranks is None or site.layer in ranks:
                groups.setdefault(id(site.module), []).append(site)
    for sites in groups.values():
        site = sites[0]
        r = ranks[site.layer] if ranks is not None else r
        if site.out_slice is None:
            layer = LoRALinear(site.module, r, alpha, dropout, dtype=dtype)
        else:
            slices = sorted(s.out_slice for s in sites)
            layer = SlicedLoRALinear(site.module, r, alpha, dropout, slices=slices, dtype=dtype)
        layer.train(site.module.training)
        injection.replace(site.parent, site.attr, layer, owned={"lora_A": layer.lora_A, "lora_B": layer.lora_B})
        injection.lora_layers.append(layer)
    return injection.lora_layers


class LoRA(peftbench.Method):
    name = "lora"
    knob = "r"
    inserts = "low-rank update (alpha/r)·B·A beside frozen target linears (default q, v); mergeable"
    default_lr = 5e-4
    schedule_lr = 5e-3  # (2e-3: 0.520, 5e-3: 0.805, 1e-2: 0.795)

    class Config(peftbench.PerLayerConfig):
        r: int = Field(8, ge=1, description="rank of B A (in every chosen layer unless layer_sizes)")
        alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA path's input")
        targets: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q", "v"])

        _targets = field_validator("targets", mode="before")(validate_targets)

    def knob_range(self, cfg, spec):
        return 1, max_rank(target_names(self.name, cfg.targets, spec), spec)

    def param_count(self, cfg, spec):
        # sum over chosen layers of r_i * sum over targets of (d_in + d_out)
        return lora_params(self.layer_knobs(cfg, spec), target_names(self.name, cfg.targets, spec), spec)

    mergeable = True  # merge() folds (alpha / r) B A into each target's weight: nothing else remains

    def inject(self, backbone, cfg):
        injection = LoRAInjection(backbone, self, cfg)
        add_lora(injection, target_names(self.name, cfg.targets, backbone.spec), self.layer_knobs(cfg, backbone.spec),
                 cfg.alpha, cfg.dropout)
        return injection

    def peft_adapter(self, injection):
        return peft_lora(injection, injection.lora_layers)


def peft_lora(injection, layers: list[LoRALinear], quantized_base: bool = False) -> peftbench.PeftAdapter | None:
    """LoRA wrappers in peft's format: one ``lora_A``/``lora_B`` per target module (its full path).

    A fused projection whose slices have their own LoRA (GPT-2's q|k|v) becomes one peft LoRA of rank
    n r: A stacks the n slices' A_i (already so stored), B is block-structured, slice i's rows (its
    output columns) holding B_i in columns i r:(i+1) r, zeros elsewhere; its alpha is n alpha so
    peft's alpha / rank stays alpha / r. None when a base is 4-bit (peft's LoRA would sit on fp weights)
    unless ``quantized_base``: the caller exports the 4-bit base with it (QLoRA).
    """
    paths = {id(module): name for name, module in injection.backbone.model.named_modules()}
    cfg = injection.config
    tensors, targets, ranks, alphas, conv1d = {}, [], {}, {}, set()
    for layer in layers:
        if peftbench.quant.is_4bit(layer.base_layer) and not quantized_base:
            return None
        path = paths[id(layer)]
        targets.append(path)
        conv1d.add(peftbench.is_conv1d(layer.base_layer))
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if layer.slices:
            n, r = len(layer.slices), layer.r
            d_out = peftbench.linear_shape(layer.base_layer)[1]
            full = b.new_zeros(d_out, n * r)  # (d_out, n r)
            for i, (start, end) in enumerate(layer.slices):
                full[start:end, i * r:(i + 1) * r] = b[i * (end - start):(i + 1) * (end - start)]
            b = full
            ranks[path], alphas[path] = n * r, n * cfg.alpha
        elif layer.r != cfg.r:  # a per-layer rank (layer_sizes): peft's scaling alpha / r follows it
            ranks[path] = layer.r
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.clone()
    if len(conv1d) > 1:
        return None  # peft's fan_in_fan_out is one flag for every target
    config = {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": targets, "fan_in_fan_out": conv1d == {True}, "bias": "none",
              "rank_pattern": ranks, "alpha_pattern": alphas}
    return peftbench.PeftAdapter(config, tensors)


@peftbench.hookimpl
def register_methods(register):
    register(LoRA)
