"""The Hessian of a model's data-averaged loss, as products on a cached gradient graph."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from .model import ModelOperator, central_difference, reraise_explained


class _GradientGraph(NamedTuple):
    """Per-batch state: private leaves, the indices of gradients with a graph, those gradients, the loss."""

    leaves: list[torch.Tensor]
    live: list[int]
    grads: list[torch.Tensor]
    loss: float


class HessianOperator(ModelOperator):
    r"""Hessian of the data-averaged loss w.r.t. (a block of) the model's parameters.

    .. math:: H = \sum_b \frac{n_b}{N} \nabla^2_\theta \ell(f_\theta(x_b), y_b)

    ``data`` is one batch ``(inputs, targets)`` or any re-iterable of batches (a DataLoader);
    batches are weighted by their sample count. On one batch the gradient graph is built once and
    reused for every product; on a dataset each batch's graph serves a whole block of products.
    Under torch.distributed (``distributed=None`` detects it) each rank holds a shard of the data.
    The model is never mutated. Its reference for :func:`~curvkit.hessian.check` (``finite_differences``)
    is the central difference of the loss gradient g, :math:`(g(\theta + s v) - g(\theta - s v)) / 2s`.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> H = HessianOperator(model, F.cross_entropy, (x, y))
    >>> H.shape
    (26, 26)
    >>> Hv = H @ torch.randn(26)

    Args and errors are those of :class:`~curvkit.hessian.model.ModelOperator`.
    """

    def _prepare(self, batch: Any) -> _GradientGraph:
        """The gradient's graph on private leaves of one batch, and the loss.

        Parameters that do not reach the loss, or whose gradient is constant, have a zero Hessian block.
        """
        leaves = [p.detach().requires_grad_() for p in self.params]
        loss = self._loss(leaves, batch)
        if not loss.requires_grad:
            return _GradientGraph(leaves, [], [], float(loss.detach()))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return _GradientGraph(leaves, live, [grads[i] for i in live], float(loss.detach()))

    def _difference_quotients(self, batch: Any, rows: torch.Tensor, rel_step: float, theta_norm: float
                              ) -> torch.Tensor:
        out = []
        for v in rows:
            norm = float(torch.linalg.vector_norm(v))
            gradient = functools.partial(self._gradient, batch, v)
            out.append(central_difference(gradient, theta_norm, norm, rel_step) if norm > 0 else torch.zeros_like(v))
        return torch.stack(out)

    def _gradient(self, batch: Any, v: torch.Tensor, t: float) -> torch.Tensor:
        """The flat loss gradient on ``batch`` at the parameters plus ``t`` times the flat vector ``v``."""
        leaves = self._shifted(self.split(v), t)
        loss = self._loss(leaves, batch)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        return self._flat(grads, v)

    def _product(self, state: _GradientGraph, v: torch.Tensor) -> torch.Tensor | None:
        """H_b v: one double backward on the cached gradient graph."""
        return self._double_backward(state, v)

    def _batched_products(self, state: _GradientGraph, rows: torch.Tensor) -> torch.Tensor | None:
        """H_b V^T for rows (k, n): one double backward batched over the rows (vmap)."""
        return self._double_backward(state, rows, batched=True)

    def _double_backward(self, state: _GradientGraph, v: torch.Tensor, batched: bool = False) -> torch.Tensor | None:
        """H_b v for a flat vector v (n,), or for rows v (k, n) with ``batched`` (None if H_b = 0)."""
        leaves, live, grads, _ = state
        if not live:
            return None
        lead = v.shape[:-1]
        chunks = v.split_with_sizes(self.sizes, dim=-1)
        vs = [chunks[i].reshape(*lead, *g.shape) if g.dtype == v.dtype else
              chunks[i].reshape(*lead, *g.shape).to(g.dtype) for i, g in zip(live, grads)]
        try:
            hv = torch.autograd.grad(grads, leaves, vs, retain_graph=True, allow_unused=True,
                                     is_grads_batched=batched)
        except RuntimeError as err:
            reraise_explained(err, "Hessian-vector products")
        return self._flat(hv, v)
