"""A bitsandbytes 4-bit layer that decodes its weight in plain torch (imported only when needed).

bitsandbytes' native CPU kernel (seen in 0.50.2 on AVX512 CPUs) decodes a 4-bit weight
wrongly when its rows are not a whole number of quantisation blocks. Such a layer keeps
bitsandbytes' storage (the same packed codes and block statistics, saved the same way) and
computes like ``Linear4bit`` on CPU (decode, then a dense product), with the decode done by
``peftbench.backbones.quant_decode.reference_dequantize``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch.nn import functional as F

from peftbench.backbones.quant_decode import reference_dequantize


class PlainDecodeLinear4bit(bnb.nn.Linear4bit):
    """``Linear4bit`` whose forward decodes the 4-bit weight with ``reference_dequantize``."""

    decodes_in_torch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        weight = reference_dequantize(self.weight).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)
