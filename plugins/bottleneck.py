"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) as forward hooks on sites.

A bottleneck maps a site's output h (width d) to h + W_up act(W_down h + b_down) + b_up with
W_down: (m, d), W_up: (d, m). It sits on a sub-layer's output projection, before the block's
residual add and LayerNorm:

- ``houlsby`` (aliases ``adapter``, ``bottleneck``): after ``attn_out`` and ``ffn_out`` of
  every layer, and trains the block's LayerNorms (``attn_norm``, ``ffn_norm``);
- ``pfeiffer``: after ``ffn_out`` only, LayerNorms frozen by default.

Size: ``m`` directly, or ``reduction_factor`` (m = d // reduction_factor); setting both is an
error. When neither is set, reduction_factor 16 applies (the adapters library's default).
When the budget solver sets ``m`` it clears ``reduction_factor``: the solver's m wins.

``Bottleneck`` is reusable: ``from peftbench_plugins.bottleneck import Bottleneck``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.autograd.function import once_differentiable

import peftbench

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
NonLinearity = Literal["relu", "gelu", "swish", "silu", "tanh"]
DEFAULT_REDUCTION = 16
NORM_SITES = ("attn_norm", "ffn_norm")


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))): down d->m, up m->d; near identity at init.

    ``init="zeros"`` makes the up-projection zero (exact identity at init), ``"normal"``
    draws it like the down-projection: normal(0, init_scale). Biases start at zero.

    Where it can (see ``_can_fuse``) the forward is one fused autograd node
    (``_FusedBottleneck``); elsewhere (autocast, mixed dtypes or devices, hooks on ``down``,
    ``up`` or ``act``, replaced sub-modules) it is the module path ``h + up(act(down(h)))``.
    ``fused = False`` (on the class or one instance) forces the module path.
    """

    fused: bool = True

    def __init__(self, d: int, m: int, non_linearity: str = "relu", init: str = "zeros",
                 init_scale: float = 1e-3, device=None, dtype=None):
        super().__init__()
        if not 1 <= m:
            raise peftbench.ConfigError(f"Bottleneck: field 'm' = {m} must be >= 1")
        if non_linearity not in ACTIVATIONS:
            raise peftbench.ConfigError(
                f"Bottleneck: field 'non_linearity' = {non_linearity!r} is unknown; allowed: {', '.join(ACTIVATIONS)}"
            )
        if init not in ("zeros", "normal"):
            raise peftbench.ConfigError(f"Bottleneck: field 'init' = {init!r}; allowed: zeros, normal")
        self.non_linearity = non_linearity
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_scale)
            nn.init.zeros_(self.down.bias)
            if init == "normal":
                nn.init.normal_(self.up.weight, std=init_scale)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to h: W_up act(W_down h + b_down) + b_up (the module path)."""
        return self.up(self.act(self.down(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._can_fuse(h):
            down, up = self.down, self.up
            args = (h, down.weight, down.bias, up.weight, up.bias, self.non_linearity)
            if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in args[1:5])):
                return _FusedBottleneck.apply(*args)
            return _bottleneck_no_grad(*args)
        return h + self.delta(h)

    def _can_fuse(self, h: torch.Tensor) -> bool:
        """The fused function computes what the module path does (up to float rounding: the
        same sums in another order); it is used when ``down`` and ``up`` are the plain
        ``nn.Linear`` layers with biases built here and ``act`` the built activation (exact
        GELU), none of them hooked (nor all modules, by a global hook), autocast is off, and h
        and the four parameters share one floating dtype and one device. The adapter has no
        dropout, so training and eval take the same path."""
        if not self.fused:
            return False
        down, up, act = self.down, self.up, self.act
        if type(down) is not nn.Linear or type(up) is not nn.Linear or type(act) is not ACTIVATIONS[self.non_linearity]:
            return False
        if down.bias is None or up.bias is None or getattr(act, "approximate", "none") != "none":
            return False
        if down._forward_hooks or down._forward_pre_hooks or up._forward_hooks or up._forward_pre_hooks or \
                act._forward_hooks or act._forward_pre_hooks or _global_hooks():
            return False
        if not h.is_floating_point() or torch.is_autocast_enabled(h.device.type):
            return False
        dtype, device = h.dtype, h.device
        return all(p.dtype == dtype and p.device == device for p in (down.weight, down.bias, up.weight, up.bias))


def _global_hooks() -> bool:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


#: activations whose derivative is a function of their output: backward reads act(z), z is not kept
_FROM_OUTPUT = ("relu", "tanh")


def _act_forward(name: str, z: torch.Tensor, out: torch.Tensor) -> None:
    """out <- act(z); for the activations of ``_FROM_OUTPUT``, z and out may be one tensor."""
    if name == "relu":
        torch.clamp_min(z, 0, out=out)
    elif name == "tanh":
        torch.tanh(z, out=out)
    elif name in ("swish", "silu"):
        torch._C._nn.silu(z, out=out)
    else:  # gelu, exact (erf) form: nn.GELU's default
        torch._C._nn.gelu(z, approximate="none", out=out)


def _act_backward(name: str, grad: torch.Tensor, z: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """dL/dz from dL/da, a = act(z): relu and tanh read a, swish and gelu read z."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)  # a > 0 exactly where z > 0
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, a)  # (1 - a^2) grad
    if name in ("swish", "silu"):
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="none")


def _bottleneck_no_grad(h, w_down, b_down, w_up, b_up, act):
    """h + act(h W_d^T + b_d) W_u^T + b_u without autograd (evaluation, inference).

    Nothing is kept for a backward pass, so the layout is the one that runs fastest in a
    forward alone: (N, m + 1), not ``_FusedBottleneck``'s (m, N). The down projection gets one
    more output, a column of ones (a zero row in W_d, bias 1); the activation runs in place on
    the other m columns; one addmm then gives h + [a, 1] [W_u^T; b_u], the up bias and the
    residual folded in as in the autograd node. The same sums as the module path, in another
    order (float rounding apart).
    """
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])  # (N, d)
    m = w_down.shape[0]
    down_aug = torch.cat([w_down, w_down.new_zeros(1, w_down.shape[1])])  # (m + 1, d)
    bias_aug = torch.cat([b_down, b_down.new_ones(1)])  # (m + 1,)
    a_aug = torch.addmm(bias_aug, h2, down_aug.t())  # (N, m + 1) = [z, 1]
    a = a_aug[:, :m]
    _act_forward(act, a, a)  # [act(z), 1], in place
    up_aug = torch.cat([w_up.t(), b_up.unsqueeze(0)])  # (m + 1, d) = [W_u^T; b_u]
    return torch.addmm(h2, a_aug, up_aug).view(shape)


class _FusedBottleneck(torch.autograd.Function):
    """y = h + act(h W_d^T + b_d) W_u^T + b_u as one autograd node (N tokens, width d, bottleneck m).

    The m-wide products are computed transposed, (m, N): on CPU BLAS the skinny (N, m)
    layout runs about half as fast. Forward: z^T = W_d h^T + b_d (one addmm), a^T = act(z^T)
    written into the first m rows of an (m + 1, N) buffer whose last row is ones, so one addmm
    gives y = h + [a, 1] [W_u^T; b_u]: the up bias and the residual add are folded into the
    up-projection. Backward, g = dL/dy: [g_{W_u}^T; g_{b_u}] = [a, 1]^T g in one mm,
    (dL/da)^T = W_u^T g^T, dL/dz = act'(z) dL/da, g_{W_d} = (dL/dz)^T h, g_{b_d} = row sums of
    (dL/dz)^T, g_h = g + (dL/dz) W_d (one addmm: the residual's gradient needs no separate
    add). Against the module path (two Linears, the activation and the add, each a node) it
    saves the skinny-layout slowdown, the (N, d) bias add and bias-gradient reduction, the
    (N, d) gradient accumulation of h's two uses, and three module calls.
    Kept for backward: h, W_d, W_u and [a, 1] (what the module path keeps), plus z for
    swish and gelu. h is not overwritten in place: it is kept for W_d's gradient, and the sum
    costs nothing extra as the output of the addmm that computes the up-projection.
    """

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up, b_up, act):
        shape = h.shape
        h2 = h.reshape(-1, shape[-1])  # (N, d)
        m, n = w_down.shape[0], h2.shape[0]
        a_aug = torch.empty(m + 1, n, dtype=h2.dtype, device=h2.device)  # [a^T; 1]
        a_t = a_aug[:m]
        from_output = act in _FROM_OUTPUT
        z_t = a_t if from_output else torch.empty_like(a_t)
        torch.addmm(b_down.unsqueeze(1), w_down, h2.t(), out=z_t)  # (m, N) = W_d h^T + b_d
        _act_forward(act, z_t, a_t)
        a_aug[m].fill_(1)
        up_aug = torch.cat([w_up.t(), b_up.unsqueeze(0)])  # (m + 1, d) = [W_u^T; b_u]
        out = torch.addmm(h2, a_aug.t(), up_aug)  # (N, d) = h + a W_u^T + b_u
        ctx.save_for_backward(h2, w_down, w_up, a_aug, None if from_output else z_t)
        ctx.act, ctx.shape = act, shape
        return out.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h2, w_down, w_up, a_aug, z_t = ctx.saved_tensors
        need_h, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:5]
        m = w_down.shape[0]
        g = grad.reshape(-1, grad.shape[-1])  # (N, d)
        grad_h = grad_wd = grad_bd = grad_wu = grad_bu = None
        if need_wu or need_bu:
            g_up = torch.mm(a_aug, g)  # (m + 1, d) = [g_{W_u}^T; g_{b_u}]
            grad_wu = g_up[:m].t() if need_wu else None
            grad_bu = g_up[m] if need_bu else None
        if need_h or need_wd or need_bd:
            gz_t = _act_backward(ctx.act, torch.mm(w_up.t(), g.t()), z_t, a_aug[:m])  # (m, N) = (dL/dz)^T
            if need_bd:
                grad_bd = gz_t.sum(1)
            if need_wd:
                grad_wd = torch.mm(gz_t, h2)  # (m, d)
            if need_h:
                grad_h = torch.addmm(g, gz_t.t(), w_down).view(ctx.shape)  # g + (dL/dz) W_d
        return grad_h, grad_wd, grad_bd, grad_wu, grad_bu, None


def _adapt(adapter: Bottleneck):
    """A forward hook that replaces a site's output h with adapter(h) = h + adapter.delta(h)."""

    def hook(module, args, output):
        return adapter(output)

    return hook


def _placement(module: nn.Module) -> dict:
    """Device and dtype for new parameters next to ``module`` (first floating parameter)."""
    for p in module.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    first = next(module.parameters(), None)
    return {"device": first.device if first is not None else None, "dtype": None}


class BottleneckConfig(peftbench.PerLayerConfig):
    m: int | None = Field(None, ge=1, description="bottleneck width (the knob); default d // reduction_factor")
    reduction_factor: int | None = Field(None, ge=1, description="m = d // reduction_factor (instead of m)")
    non_linearity: NonLinearity = Field("relu", description="activation inside the bottleneck")
    init: Literal["zeros", "normal"] = Field("zeros", description="up-projection init: zeros (exact identity at "
                                             "init) or normal(0, init_scale)")
    init_scale: float = Field(1e-3, gt=0, le=1e-2, description="std of the normal init (Houlsby: robust below 1e-2)")
    train_layer_norms: bool = Field(False, description="also train the adapted blocks' LayerNorms")

    id_fields_at_default = ("layers",)  # bottleneck trials stored layers: null before placement: their ids stay

    @model_validator(mode="after")
    def _one_size(self):
        if self.m is not None and self.reduction_factor is not None:
            raise ValueError(f"set either 'm' ({self.m}) or 'reduction_factor' ({self.reduction_factor}), not both")
        return self


class HoulsbyConfig(BottleneckConfig):
    non_linearity: NonLinearity = Field("swish", description="activation inside the bottleneck")
    train_layer_norms: bool = Field(True, description="also train the adapted blocks' LayerNorms (Houlsby et al.)")


class _BottleneckMethod(peftbench.Method):
    knob = "m"
    #: ``reduction_factor`` fixes m (= d // reduction_factor) as ``m`` does: setting either pins the size
    size_fields = ("reduction_factor",)
    default_lr = 1e-3
    Config = BottleneckConfig
    #: the sites that get an adapter on their output, in every adapted layer
    sites: ClassVar[tuple[str, ...]] = ()

    # -- sizes -----------------------------------------------------------------------------
    def width(self, cfg: BottleneckConfig, spec: peftbench.BackboneSpec) -> int:
        """The bottleneck m: ``m`` if set, else d // reduction_factor (default 16)."""
        if cfg.m is not None:
            return cfg.m
        return spec.hidden // (cfg.reduction_factor or DEFAULT_REDUCTION)

    def knob_range(self, cfg, spec):
        return 1, spec.hidden

    def identity_at_init(self, cfg):
        return cfg.init == "zeros"  # a zero up-projection adds nothing until trained ("normal": near identity)

    def with_knob(self, cfg, value):
        # the solver's m replaces a reduction_factor (setting both is otherwise an error)
        return self.config(cfg, m=int(value), reduction_factor=None)

    def check(self, cfg, spec):
        for site in (*self.sites, *(NORM_SITES if cfg.train_layer_norms else ())):
            if not spec.has_site(site):
                raise peftbench.ConfigError(f"method {self.name!r}: backbone {spec.name} has no site {site!r}")
        d, m = spec.hidden, self.width(cfg, spec)
        if cfg.m is None and m < 1:
            raise peftbench.ConfigError(
                f"method {self.name!r}: field 'reduction_factor' = {cfg.reduction_factor} gives m = {d} // "
                f"{cfg.reduction_factor} = 0 on {spec.name}; allowed reduction_factor 1..{d}"
            )
        if not 1 <= m <= d:
            raise peftbench.ConfigError(
                f"method {self.name!r}: field 'm' = {m} is out of range on {spec.name} (allowed 1..{d})"
            )
        self.layer_knobs(cfg, spec, uniform=m)  # placement: layers and per-layer widths checked

    def param_count(self, cfg, spec):
        # per adapter: down d*m + m, up m*d + d  ->  2*d*m + m + d
        # total: sum over chosen layers i of |sites| * (2*d*m_i + m_i + d) + [trained] the block's LayerNorm params
        self.check(cfg, spec)
        d = spec.hidden
        norms = sum(spec.norm_params.get(name, 0) for name in NORM_SITES) if cfg.train_layer_norms else 0
        widths = self.layer_knobs(cfg, spec, uniform=self.width(cfg, spec)).values()
        return sum(len(self.sites) * (2 * d * m + m + d) + norms for m in widths)

    # -- building --------------------------------------------------------------------------
    def inject(self, backbone, cfg):
        spec = backbone.spec
        d = spec.hidden
        injection = peftbench.Injection(backbone, self, cfg)
        blocks = backbone.layer_modules()
        for i, m in self.layer_knobs(cfg, spec, uniform=self.width(cfg, spec)).items():
            for name in self.sites:
                site = backbone.site(i, name)
                adapter = Bottleneck(d, m, cfg.non_linearity, cfg.init, cfg.init_scale, **_placement(site.module))
                injection.attach(blocks[i], f"{self.name}_{name}", adapter)
                injection.add_hook(site.module, _adapt(adapter))
            if cfg.train_layer_norms:
                for name in NORM_SITES:
                    site = backbone.site(i, name)
                    injection.train_base({f"{site.path}.{p}": param for p, param in site.module.named_parameters()})
        return injection


class Houlsby(_BottleneckMethod):
    name = "houlsby"
    aliases = ("adapter", "bottleneck")
    inserts = "bottleneck adapter (d->m->d, skip) on attn_out and ffn_out of each layer; trains the LayerNorms"
    Config = HoulsbyConfig
    sites = ("attn_out", "ffn_out")
    schedule_lr = 3e-3  # (1e-3: 0.460, 3e-3: 0.755, 1e-2: 0.705)


class Pfeiffer(_BottleneckMethod):
    name = "pfeiffer"
    inserts = "bottleneck adapter (d->m->d, skip) on ffn_out of each layer"
    Config = BottleneckConfig
    sites = ("ffn_out",)
    schedule_lr = 1e-2  # (3e-3: 0.640, 1e-2: 0.790, 3e-2: 0.460)


@peftbench.hookimpl
def register_methods(register):
    register(Houlsby)
    register(Pfeiffer)
