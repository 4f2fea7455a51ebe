"""(IA)^3 for peftbench, written against peftbench's public API only (``import peftbench``).

    k' = l_k * k        v' = l_v * v        ffn_out(l_ff * a)        l_k, l_v, l_ff start at 1

k and v are the outputs of the ``k`` and ``v`` sites (on GPT-2 both are slices of the fused
``c_attn``: ``Site.out_slice`` says which columns); ``a`` is the FFN's inner activation, the input
of the ``ffn_out`` site, reached by a forward pre-hook. Parameters: L * (k_out + v_out + ffn_inner),
with GQA's k and v of kv_heads * head_dim. No size knob: the budget does not size it.
"""

from __future__ import annotations

import peftbench
import torch
from pydantic import Field
from torch import nn

__version__ = "0.1.0"


def _scale(vector: torch.Tensor, width: int, out_slice) -> torch.Tensor:
    """A (width,) scale: ``vector`` on the slice's columns, 1 elsewhere (the whole width without a slice)."""
    if out_slice is None:
        return vector
    start, end = out_slice
    ones = vector.new_ones(width)
    return torch.cat([ones[:start], vector, ones[end:]])


class IA3Injection(peftbench.Injection):
    """Hooks that rescale while unmerged; ``merge`` folds the scales into the weights instead."""

    def __init__(self, backbone, method, cfg):
        super().__init__(backbone, method, cfg)
        #: (module, "out" or "in", out_slice, vector) for every scale, in the order applied
        self.scales: list[tuple[nn.Module, str, tuple[int, int] | None, nn.Parameter]] = []
        self.merged = False
        self._originals: dict[int, tuple[nn.Module, nn.Parameter, nn.Parameter | None]] = {}

    @torch.no_grad()
    def merge(self) -> None:
        """W, b of each k/v projection times l on its output columns; ffn_out's W times l_ff on its inputs."""
        if self.merged:
            return
        for module, side, out_slice, vector in self.scales:
            if id(module) not in self._originals:
                self._originals[id(module)] = (module, module.weight, module.bias)
            weight = module.weight.detach().clone()
            rows = weight.T if peftbench.is_conv1d(module) else weight  # (d_out, d_in) view either way
            d_in, d_out = peftbench.linear_shape(module)
            if side == "out":
                scale = _scale(vector.detach(), d_out, out_slice)
                rows.mul_(scale[:, None])
                if module.bias is not None:
                    module.bias = nn.Parameter(module.bias.detach() * scale, requires_grad=False)
            else:
                rows.mul_(vector.detach()[None, :])
            module.weight = nn.Parameter(weight, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """The original weight and bias objects back, bit for bit."""
        for module, weight, bias in self._originals.values():
            module.weight, module.bias = weight, bias
        self._originals.clear()
        self.merged = False


class IA3(peftbench.Method):
    name = "ia3"
    knob = None  # one size per backbone: the budget does not size it
    inserts = "(IA)^3: learned scales of keys, values and the FFN activation (ones at init); mergeable"
    aliases = ("ia³",)
    default_lr = 3e-3
    mergeable = True
    in_default_grid = False  # a bare `peftbench run` stays the built-in comparison; name it: --methods ia3,lora

    class Config(peftbench.MethodConfig):
        attention: list[str] = Field(default_factory=lambda: ["k", "v"],
                                     description="attention outputs to rescale: any of k, v, q")
        feedforward: bool = Field(True, description="also rescale the FFN's inner activation (ffn_out's input)")

    def check(self, cfg, spec):
        bad = [s for s in cfg.attention if s not in ("q", "k", "v") or s not in spec.site_shapes]
        if bad:
            raise peftbench.ConfigError(f"method {self.name!r}: field 'attention' names {bad}; allowed: the "
                                        f"sites of q, k, v that {spec.name} has")

    def param_count(self, cfg, spec):
        # L * (sum over attention sites of d_out  +  ffn_out's d_in when feedforward)
        per_layer = sum(spec.site_shapes[s][1] for s in cfg.attention)
        if cfg.feedforward:
            per_layer += spec.site_shapes["ffn_out"][0]
        return spec.layers * per_layer

    def identity_at_init(self, cfg):
        return True  # every scale starts at 1

    def inject(self, backbone, cfg):
        injection = IA3Injection(backbone, self, cfg)
        blocks = backbone.layer_modules()
        for layer, block in enumerate(blocks):
            sites = {name: backbone.site(layer, name) for name in cfg.attention}
            ffn = backbone.site(layer, "ffn_out") if cfg.feedforward else None
            like = next(p for p in block.parameters() if p.is_floating_point())
            vectors = nn.ParameterDict({name: nn.Parameter(torch.ones(site.out_features, device=like.device,
                                                                      dtype=like.dtype))
                                        for name, site in sites.items()})
            if ffn is not None:
                vectors["ff"] = nn.Parameter(torch.ones(ffn.in_features, device=like.device, dtype=like.dtype))
            injection.attach(block, self.name, vectors)
            for name, site in sites.items():
                vector = vectors[name]
                width = peftbench.linear_shape(site.module)[1]
                injection.scales.append((site.module, "out", site.out_slice, vector))

                def out_hook(module, args, out, vector=vector, width=width, out_slice=site.out_slice):
                    return out if injection.merged else out * _scale(vector, width, out_slice)

                injection.add_hook(site.module, out_hook)
            if ffn is not None:
                vector = vectors["ff"]
                injection.scales.append((ffn.module, "in", None, vector))

                def in_hook(module, args, vector=vector):  # the FFN activation enters ffn_out here
                    return args if injection.merged else (args[0] * vector, *args[1:])

                injection.add_hook(ffn.module, in_hook, pre=True)
        return injection


@peftbench.hookimpl
def register_methods(register):
    register(IA3)
