"""The process's place under ``torchrun``/``accelerate launch``: every rank trains, rank 0 alone
writes (store, suite folder, artifacts, report)."""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else torchrun's RANK/WORLD_SIZE."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_distributed(cpu: bool) -> None:
    """Start the process group the Trainer will use (accelerate's choice of backend: gloo on CPU)."""
    from accelerate import PartialState

    PartialState(cpu=cpu)


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
