"""torch.distributed helpers shared by the optimizers."""

from __future__ import annotations

import torch
import torch.distributed as dist


def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over the ranks of the default process group in place, with one all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
