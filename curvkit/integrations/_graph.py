"""Which optimizers' next step differentiates the gradients, seen through the frameworks' optimizer wrappers."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from .._utils.borrow import twice_differentiable


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, ``LightningOptimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def needs_graph(optimizers: Iterable[torch.optim.Optimizer | None]) -> bool:
    """Whether the next step of any of ``optimizers`` differentiates the gradients (``next_step_needs_graph()``).

    Optimizers without that method (torch's) never do.
    """
    for optimizer in optimizers:
        ask = getattr(unwrap(optimizer), "next_step_needs_graph", None) if optimizer is not None else None
        if callable(ask) and ask():
            return True
    return False


def curvature_forward(optimizers: Iterable[torch.optim.Optimizer | None]) -> AbstractContextManager:
    """Twice-differentiable kernels (math attention) for a forward whose backward will keep the graph, else nothing."""
    return twice_differentiable() if needs_graph(optimizers) else nullcontext()
