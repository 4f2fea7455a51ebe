"""4-bit NF4 support shared by 4-bit methods, and logical parameter counts.

A packed 4-bit tensor's ``numel()`` is half its logical parameter count; every count in
peftbench goes through ``logical_numel`` so 4-bit weights are counted from their shapes.
"""

from __future__ import annotations

import torch


def logical_numel(param: torch.Tensor) -> int:
    """Logical number of parameters (the unpacked shape for bitsandbytes 4-bit weights)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for s in state.shape:
            n *= int(s)
        return n
    return param.numel()
