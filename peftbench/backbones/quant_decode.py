"""The bitsandbytes import guard and a plain-torch decode of 4-bit NF4 weights.

Both ``quant`` (quantising, checking, counting) and ``quant_layers`` (the layer that decodes
in torch) build on this module; neither imports the other's code at import time.
"""

from __future__ import annotations

import math

import torch

from peftbench.backbones.bnb_notice import quiet_bitsandbytes
from peftbench.errors import ConfigError

QUANT_INSTALL = "pip install bitsandbytes"


def require_bitsandbytes(method: str | None = None):
    """The ``bitsandbytes`` module, or a ConfigError naming the method (when given) and the install."""
    quiet_bitsandbytes()  # its known optional-kernel notice, not ours to show
    try:
        import bitsandbytes
    except Exception as exc:  # missing (ImportError) or broken install
        who = f"method {method!r}" if method else "4-bit quantisation"
        raise ConfigError(f"{who} needs bitsandbytes: {QUANT_INSTALL} ({type(exc).__name__}: {exc})") from None
    return bitsandbytes


def reference_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight decoded in plain torch: codebook value × its block's absmax."""
    state = weight.quant_state
    packed = weight.data.reshape(-1).view(torch.uint8)
    codes = torch.stack(((packed >> 4) & 15, packed & 15), dim=1).reshape(-1).long()  # high nibble first
    n = math.prod(state.shape)
    absmax = state.absmax
    if state.nested:
        bnb = require_bitsandbytes()
        absmax = bnb.functional.dequantize_blockwise(absmax, state.state2) + state.offset
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    values = state.code.to(packed.device).float()[codes[:n]]
    return (values * scale).reshape(tuple(state.shape)).to(state.dtype)
