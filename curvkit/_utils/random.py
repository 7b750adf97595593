"""Randomness enters only through explicit seeds or generators; the global RNG is never touched."""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed

Seed = Union[None, int, torch.Generator]


def make_generator(seed: Seed, shared: bool = False) -> torch.Generator:
    """A private generator: ``None`` draws fresh OS entropy, an int seeds it, a Generator is used as is.

    ``shared=True`` (torch.distributed) makes a ``None`` seed identical on every rank by
    broadcasting rank 0's entropy, so all ranks draw the same probes.
    """
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None and shared:
        entropy = torch.randint(0, 2**62, (1,), generator=make_generator(None))
        if torch.distributed.get_backend() == "nccl":  # NCCL broadcasts CUDA tensors only
            entropy = entropy.to(f"cuda:{torch.cuda.current_device()}")
        torch.distributed.broadcast(entropy, src=0)
        gen.manual_seed(int(entropy))
    elif seed is None:
        gen.seed()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        gen.manual_seed(seed)
    else:
        raise TypeError(f"seed must be None, an int or a torch.Generator, got {type(seed).__name__}")
    return gen


def rademacher_matrix(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(n, k)`` float64 matrix of independent +-1 entries, drawn on the generator's device."""
    z = torch.randint(0, 2, (n, k), generator=gen, device=gen.device, dtype=torch.int8)
    return (z.to(device=device, dtype=torch.float64) * 2 - 1)


def gaussian(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(n, k)`` float64 standard normal matrix, drawn on the generator's device."""
    return torch.randn(n, k, generator=gen, device=gen.device, dtype=torch.float64).to(device)
