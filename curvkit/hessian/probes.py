r"""Curvature probes on a gradient graph that already exists (the optimizers' hot path).

An optimizer that has just computed g = grad(loss, params, create_graph=True) gets Hessian-vector
products from the same graph: H z = grad(g, params, z). The Hutchinson diagonal estimate is
D = z * (H z) with Rademacher z, E[D] = diag(H), E[D_i^2] = ||H_{i,:}||^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rademacher_like(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Independent +-1 tensors shaped like ``tensors``, drawn in one call from ``generator``."""
    sizes = [t.numel() for t in tensors]
    flat = torch.randint(0, 2, (sum(sizes),), generator=generator, device=generator.device, dtype=torch.int8)
    flat = flat.to(device=tensors[0].device, dtype=tensors[0].dtype).mul_(2).sub_(1)
    return [z.view(t.shape).to(t) for z, t in zip(flat.split(sizes), tensors)]


def hutchinson_diagonal(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                        generator: torch.Generator, n_samples: int = 1) -> list[torch.Tensor]:
    r"""Mean over ``n_samples`` Rademacher probes of z * (H z), per parameter.

    ``grads`` must carry a graph (from ``create_graph=True``); the graph is released after the
    last probe. Parameters that the gradients do not depend on get zeros.
    """
    total = None
    for i in range(n_samples):
        zs = rademacher_like(params, generator)
        hz = torch.autograd.grad(grads, params, zs, retain_graph=i < n_samples - 1, allow_unused=True)
        d = [z.mul_(h) if h is not None else torch.zeros_like(z) for z, h in zip(zs, hz)]
        if total is None:
            total = d
        else:
            torch._foreach_add_(total, d)
    if n_samples > 1:
        torch._foreach_div_(total, float(n_samples))
    return total
