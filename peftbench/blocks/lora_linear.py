"""The LoRA linear layer, a public building block for methods that add a low-rank update to linear
sites (LoRA, QLoRA, DoRA-style variants, adapter+LoRA mixes), built-in or third-party.

    h = W x + (alpha / r) * B A x        A: (r, d_in) kaiming-uniform, B: (d_out, r) zero

- ``LoRALinear(base_layer, r, alpha, dropout)`` wraps a frozen ``nn.Linear``, a transformers
  ``Conv1D`` (GPT-2, weight stored (in, out)) or a 4-bit layer (``peftbench.quant``); it keeps the
  original as ``base_layer`` and can ``merge()``/``unmerge()``;
- ``SlicedLoRALinear(..., slices=[(start, end), ...])`` puts one update on each output slice of a
  fused projection (GPT-2's q|k|v ``c_attn``: ``Site.out_slice``), each landing in its slice only;
- ``add_lora(injection, names, r, alpha, dropout)`` wraps every layer's sites ``names`` (slices of
  one fused module share one wrapper) through ``Injection.replace`` (undone by ``remove()``);
- ``LoRAInjection`` merges and unmerges every wrapper it made.
Where it can, the forward is one fused autograd node (``_FusedLoRA``) computing what the module
path does (up to float rounding).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.backbones import quant
from peftbench.backbones.layout import Site, is_conv1d, linear_shape
from peftbench.contract.injection import Injection

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import BackboneSpec  # noqa: F401


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
        d_in, d_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        #: output columns each LoRA writes, as (start, end); None: the whole output
        self.slices = slices
        n = len(slices) if slices else 1
        width = _b_rows(slices)[-1][1] if slices else d_out  # B's rows: every slice's width, stacked
        weight = _floating_weight(base_layer)
        factory = {"device": weight.device if weight is not None else None,
                   "dtype": dtype or (weight.dtype if weight is not None else None)}
        # with slices, A and B of slice i are rows i*r:(i+1)*r of A and _b_rows(slices)[i] of B
        # (slices may differ in width: Phi-3's GQA q|k|v)
        self.lora_A = nn.Linear(d_in, n * r, bias=False, **factory)  # weight (n*r, d_in)
        self.lora_B = nn.Linear(r, width, bias=False, **factory)  # weight (sum of slice widths, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # bound 1/sqrt(d_in), as peft
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self._unmerged: list[nn.Parameter] = []  # the original weight while merged (a list: not registered)
        # bases the fused function handles: a plain float nn.Linear (not a subclass such as 4-bit) or Conv1D
        self._base_type = type(base_layer)
        plain = not quant.is_4bit(base_layer) and weight is not None and weight.is_floating_point()
        self._base_kind = ("linear" if type(base_layer) is nn.Linear else
                           "conv1d" if is_conv1d(base_layer) else None) if plain else None

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
        return [(s, e, self.scaling * (b[lo:hi] @ a[i * r:(i + 1) * r]))
                for i, ((s, e), (lo, hi)) in enumerate(zip(slices, _b_rows(slices)))]

    def b_rows(self) -> list[tuple[int, int]]:
        """Rows of ``lora_B.weight`` holding each slice's B_i, as (start, end); slices may differ in width."""
        return _b_rows(self.slices) if self.slices else [(0, self.lora_B.weight.shape[0])]

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A in a new weight; the original is kept for ``unmerge``."""
        if self.merged:
            return
        base = self.base_layer
        four_bit = quant.is_4bit(base)
        dense = quant.dequantize_weight(base) if four_bit else base.weight.detach().clone()
        rows = dense.T if is_conv1d(base) else dense  # (d_out, d_in) view either way
        for start, end, delta in self.delta_weights():
            rows[start:end] += delta.to(rows.dtype)
        self._unmerged = [base.weight]
        if four_bit:  # requantised: merged 4-bit outputs carry a second rounding error
            base.weight = quant.requantize(base, dense)
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
        for i, ((start, end), (lo, hi)) in enumerate(zip(self.slices, _b_rows(self.slices))):
            # h[..., slice i] + B_i (alpha / r) A_i x
            delta = F.linear(ax[..., i * r:(i + 1) * r], b[lo:hi])
            pieces += [h[..., done:start], h[..., start:end] + delta]
            done = end
        pieces.append(h[..., done:])
        return torch.cat(pieces, dim=-1)


def _b_rows(slices: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rows of the stacked ``lora_B`` that hold each slice's B_i: the slices' widths, one after another."""
    rows, top = [], 0
    for start, end in slices:
        rows.append((top, top + end - start))
        top += end - start
    return rows


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
        for i, ((start, end), (lo, hi)) in enumerate(zip(slices, _b_rows(slices))):
            out[:, start:end].addmm_(ax[:, i * r:(i + 1) * r], lora_b[lo:hi].t(), alpha=scaling)
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
            for i, ((start, end), (lo, hi)) in enumerate(zip(slices, _b_rows(slices))):
                out[:, start:end].addmm_(sax_t[i * r:(i + 1) * r].t(), lora_b[lo:hi].t().contiguous())
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
            for i, ((start, end), (lo, hi)) in enumerate(zip(slices, _b_rows(slices))):
                gi = g[:, start:end]  # (N, w): slice i's columns
                if need_gsax:
                    pieces_a.append(torch.mm(lora_b[lo:hi].t().contiguous(), gi.t()))  # (r, N)
                if need_b:
                    pieces_b.append(torch.mm(sax_t[i * r:(i + 1) * r], gi).t())  # (w, r)
            gsax_t = torch.cat(pieces_a, dim=0) if pieces_a else None  # (n r, N)
            grad_b = torch.cat(pieces_b, dim=0) if pieces_b else None  # (sum of widths, r)
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


class LoRAInjection(Injection):
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


def add_lora(injection: LoRAInjection, names: list[str], r: int | dict[int, int], alpha: float, dropout: float,
             dtype: torch.dtype | None = None) -> list[LoRALinear]:
    """Wrap the sites ``names`` in LoRA: in every layer at rank ``r`` (an int), or in the layers of
    ``r = {layer: rank}`` only, each at its layer's rank (``alpha``, input ``dropout``; ``dtype`` of A and B,
    default the base's). Slices of one fused module share one ``SlicedLoRALinear``. Each wrapper replaces
    its module through ``injection.replace`` (A and B owned: saved, counted) and is appended to
    ``injection.lora_layers``, which is returned."""
    ranks = r if isinstance(r, dict) else None
    groups: dict[int, list[Site]] = {}
    for name in names:
        for site in injection.backbone.sites(name):
            if ranks is None or site.layer in ranks:
                groups.setdefault(id(site.module), []).append(site)
    for sites in groups.values():
        site = sites[0]
        rank = ranks[site.layer] if ranks is not None else r
        if site.out_slice is None:
            layer = LoRALinear(site.module, rank, alpha, dropout, dtype=dtype)
        else:
            slices = sorted(s.out_slice for s in sites)
            layer = SlicedLoRALinear(site.module, rank, alpha, dropout, slices=slices, dtype=dtype)
        layer.train(site.module.training)
        injection.replace(site.parent, site.attr, layer, owned={"lora_A": layer.lora_A, "lora_B": layer.lora_B})
        injection.lora_layers.append(layer)
    return injection.lora_layers
