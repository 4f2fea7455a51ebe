"""Public API for 4-bit methods (``peftbench.quant``): NF4 layers and logical parameter counts.

A plugin that stores frozen weights in 4 bits builds on these helpers (QLoRA does): quantise
a linear layer with bitsandbytes (``quantize_linear``), decode it (``dequantize_weight``),
re-quantise a merged weight (``requantize``), tell a 4-bit layer (``is_4bit``) and measure
what it stores (``quantized_bytes``, ``quantized_params``). Functions that can fail for want
of bitsandbytes take the caller's method name, so the error names the method.

A packed 4-bit tensor's ``numel()`` is half its logical parameter count; every count in
peftbench goes through ``logical_numel`` so 4-bit weights are counted from their shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.backbones.layout import is_conv1d, linear_shape
from peftbench.backbones.quant_decode import QUANT_INSTALL, reference_dequantize, require_bitsandbytes

__all__ = [
    "QUANT_INSTALL", "check_dequantization", "dequantize_weight", "is_4bit", "keep_one_format", "logical_numel",
    "quantize_linear", "quantized_bytes", "quantized_params", "reference_dequantize", "require_bitsandbytes",
    "requantize",
]


def logical_numel(param: torch.Tensor) -> int:
    """Logical number of parameters (the unpacked shape for bitsandbytes 4-bit weights)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for s in state.shape:
            n *= int(s)
        return n
    return param.numel()


# -- 4-bit NF4 layers (bitsandbytes) ---------------------------------------------------------
def is_4bit(module: nn.Module) -> bool:
    """True for a layer whose weight is a quantised bitsandbytes 4-bit tensor."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def quantize_linear(linear: nn.Module, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                    quant_type: str = "nf4", method: str | None = None) -> nn.Module:
    """A frozen ``bitsandbytes.nn.Linear4bit`` holding ``linear``'s weight (Linear or Conv1D).

    The new layer is built on ``linear``'s device; ``linear`` itself is left untouched.
    ``double_quant`` also quantises the per-block absmax statistics (QLoRA's double quantisation).
    ``method`` (the caller's method name) is named if bitsandbytes is missing.
    """
    bnb = require_bitsandbytes(method)
    d_in, d_out = linear_shape(linear)
    weight = linear.weight.detach()
    if is_conv1d(linear):
        weight = weight.T  # Conv1D stores (d_in, d_out); Linear4bit wants (d_out, d_in)
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=linear.bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
    # quantisation happens when a Params4bit moves to a real device; it reads ``weight``, never writes it
    layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, module=layer).to(weight.device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.train(linear.training)
    keep_one_format(layer)
    if not check_dequantization(layer, method):
        # one decode per layer at injection time; such a layer keeps bitsandbytes' storage and decodes in torch
        from peftbench.backbones.quant_layers import PlainDecodeLinear4bit

        layer.__class__ = PlainDecodeLinear4bit
    return layer


def keep_one_format(layer: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking ``layer``'s weight for its CPU inference kernel.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients rewrites
    the weight in place into another layout with bfloat16 block statistics. Evaluation would
    then depend on the machine's instruction set (a trial's metrics must not), and the rewrite
    fails outright on layers narrower than a quantisation block. Training and CUDA never take
    that path, so turning it off changes nothing there.
    """
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    return layer


def check_dequantization(layer: nn.Module, method: str | None = None) -> bool:
    """True when bitsandbytes decodes ``layer``'s 4-bit weight like ``reference_dequantize``.

    bitsandbytes' native CPU kernel (seen in 0.50.2 on AVX512 CPUs) miscomputes weights whose
    rows are not a whole number of blocks, silently: training would run on a corrupted base.
    """
    bnb = require_bitsandbytes(method)
    got = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    want = reference_dequantize(layer.weight).float()
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) floating-point weight a 4-bit layer stands for (a new tensor)."""
    bnb = require_bitsandbytes()
    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        layer.state_dict()  # bitsandbytes undoes its CPU inference packing while saving
    if getattr(layer, "decodes_in_torch", False):
        return reference_dequantize(layer.weight)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def requantize(layer: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new 4-bit weight for ``layer`` from the dense (d_out, d_in) ``weight``, quantised as before."""
    bnb = require_bitsandbytes()
    old = layer.weight
    return bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=old.blocksize,
                             compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                             quant_storage=old.quant_storage).to(weight.device)


def _state_tensors(state):
    """Every tensor a bitsandbytes QuantState holds (absmax, code, offset, the nested state2 ...)."""
    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif hasattr(value, "absmax"):  # nested QuantState of double quantisation
            yield from _state_tensors(value)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes the 4-bit weights under ``module`` really occupy: packed data + quantisation state."""
    seen, total = set(), 0
    for layer in module.modules():
        if not is_4bit(layer):
            continue
        for t in (layer.weight.data, *_state_tensors(layer.weight.quant_state)):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def quantized_params(module: nn.Module) -> int:
    """Logical parameters stored in 4-bit under ``module``."""
    return sum(logical_numel(layer.weight) for layer in module.modules() if is_4bit(layer))
