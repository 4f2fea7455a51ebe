"""A backbone's identity: a hash of its frozen weights, so an adapter is never loaded onto another base.

The hash covers every tensor of the model's state dict except the task head (its own trained
part, saved with the adapter), in name order, with each name, dtype and shape. Take it before a
method is applied: injections rename (``base_layer``) or requantise (4-bit) base weights.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from peftbench.backbones.backbone import Backbone


def fingerprint(backbone: "Backbone") -> str:
    """``sha256:<hex>`` of the backbone's weights (task head excluded)."""
    head = set(backbone.head_parameters())
    digest = hashlib.sha256()
    state = backbone.model.state_dict()
    for name in sorted(state):
        if name in head:
            continue
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return f"sha256:{digest.hexdigest()}"
