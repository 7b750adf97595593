"""The Hessian of a model's data-averaged loss, as products on a cached gradient graph."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from .model import ModelOperator, central_difference, dense, reraise_explained


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
            gradient = functools.partial(self._gradient, batch, self.split(v))
            out.append(central_difference(gradient, theta_norm, norm, rel_step) if norm > 0 else torch.zeros_like(v))
        return torch.stack(out)

    def _gradient(self, batch: Any, pieces: list[torch.Tensor], t: float) -> torch.Tensor:
        """The flat loss gradient on ``batch`` at the parameters plus ``t`` times ``pieces``."""
        leaves = self._shifted(pieces, t)
        loss = self._loss(leaves, batch)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        return self._flat(grads, pieces[0])

    def _products(self, state: _GradientGraph, rows: torch.Tensor) -> torch.Tensor | None:
        """All rows in one batched double backward (vmap) when the model allows it, else one at a time."""
        leaves, live, grads, _ = state
        if not live:
            return None
        k = rows.shape[0]
        if k == 1 or not self._batched_ok:
            flat = [self._flat(self._vjp(grads, leaves, self._chunks(row, grads, live)), rows) for row in rows]
            return flat[0][None] if k == 1 else torch.stack(flat)
        chunks = torch.split(rows, self.sizes, dim=1)
        vs = [chunks[i].reshape(k, *g.shape).to(g.dtype) for g, i in zip(grads, live)]
        try:
            hv = self._vjp(grads, leaves, vs, batched=True)
        except RuntimeError:
            self._batched_ok = False  # an op without a batching rule: products one at a time from now on
            return self._products(state, rows)
        return torch.cat([(dense(h).reshape(k, -1) if h is not None else rows.new_zeros(k, p.numel()))
                          for h, p in zip(hv, self.params)], 1)

    def _chunks(self, v: torch.Tensor, grads, live) -> list[torch.Tensor]:
        """A flat vector's pieces for the parameters whose gradients carry a graph."""
        chunks = torch.split(v, self.sizes)
        return [chunks[i].view_as(g) if g.dtype == v.dtype else chunks[i].view_as(g).to(g.dtype)
                for g, i in zip(grads, live)]

    @staticmethod
    def _vjp(grads, leaves, vs, batched: bool = False):
        try:
            return torch.autograd.grad(grads, leaves, vs, retain_graph=True, allow_unused=True,
                                       is_grads_batched=batched)
        except RuntimeError as err:
            reraise_explained(err, "Hessian-vector products (and GGN products)")
