"""Which device and numeric precision a trial uses; unavailable choices are clear errors."""

from __future__ import annotations

import torch

from peftbench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: torch {torch.__version__} sees no CUDA device here; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA that supports it, else fp16 on CUDA, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"precision {precision!r} needs a CUDA device (this trial runs on {device}); use fp32 or auto")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; use fp16 or auto")
    return precision
