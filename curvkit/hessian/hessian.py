"""The Hessian of a model's data-averaged loss, as products on a cached gradient graph."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from .model import ModelOperator, central_difference, dense, reraise_explained


class _GradientGraph(NamedTuple):
    """Per-batch state: private leaves, the flat loss gradient with its graph (None: H_b = 0), the loss."""

    leaves: list[torch.Tensor]
    gradient: torch.Tensor | None
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
        """The graph of the flat loss gradient on private leaves of one batch, and the loss.

        The gradient is concatenated inside the graph, so a product's flat direction is split by the
        concatenation's backward, not in Python. Parameters that do not reach the loss, or whose gradient
        is constant, have a zero Hessian block.
        """
        leaves = [p.detach().requires_grad_() for p in self.params]
        loss = self._loss(leaves, batch)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True) if loss.requires_grad \
            else [None] * len(leaves)
        gradient = torch.cat([dense(g).reshape(-1) if g is not None else leaf.new_zeros(leaf.numel())
                              for g, leaf in zip(grads, leaves)])
        return _GradientGraph(leaves, gradient if gradient.requires_grad else None, float(loss.detach()))

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
        leaves, gradient, _ = state
        if gradient is None:
            return None
        try:
            hv = torch.autograd.grad(gradient, leaves, v, retain_graph=True, allow_unused=True,
                                     is_grads_batched=batched)
        except RuntimeError as err:
            reraise_explained(err, "Hessian-vector products")
        return self._flat(hv, v)
