r"""The Hessian of a closure's loss with respect to a list of tensors, on the gradient graph of one call.

Newton-type optimizers hold parameters and a closure, not a model, a loss function and data:
:class:`ClosureHessianOperator` calls the closure once, keeps the graph of its gradient, and serves
every product from it (as :class:`~curvkit.hessian.HessianOperator` does per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .._utils.borrow import require_scalar_loss, twice_differentiable
from .model import reraise_explained
from .operator import CurvatureOperator


class ClosureHessianOperator(CurvatureOperator):
    r"""Hessian :math:`\nabla^2 \ell(\theta)` of the scalar :math:`\ell = \mathrm{closure}()` w.r.t. ``params``.

    The closure is called once, at construction, with autograd on and PyTorch's twice-differentiable
    attention kernel selected; the graph of its gradient :math:`g = \nabla \ell(\theta)` serves every
    product :math:`H v = \nabla (g^\top v)` (one double backward per column). ``loss`` and ``gradient``
    are that call's value and gradient, so an optimizer gets :math:`\ell`, :math:`g` and :math:`H` from one
    forward pass. Tensors that do not reach the loss, or whose gradient is constant, have a zero block.

    ``params`` are the caller's own tensors (the closure reads them), so the operator describes them as
    they were at construction: after any in-place change to them, products raise instead of mixing
    points. Nothing else is touched: ``.grad`` and ``requires_grad`` stay as they are. The operator
    sees only this process's closure (under torch.distributed, average the products yourself).

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> H = ClosureHessianOperator([w], lambda: (w ** 3).sum())
    >>> (H @ torch.tensor([1.0, 1.0])).tolist(), H.gradient.tolist()
    ([6.0, 12.0], [3.0, 12.0])

    Args:
        params: the floating-point tensors (e.g. ``model.parameters()``) to differentiate, each with
            ``requires_grad=True``.
        closure: ``closure() -> loss``, a scalar tensor computed from ``params``; it must not call backward.

    Attributes:
        loss: the closure's value (a detached 0-dim tensor).
        gradient: the flat gradient :math:`g` in float64 (zero for tensors the loss does not reach).

    Raises:
        ValueError: ``params`` is empty, the closure's result is not a scalar tensor, or it does not
            depend on ``params`` through autograd.
        TypeError: an entry of ``params`` is not a floating-point tensor that requires grad.
        FloatingPointError: the loss is NaN or infinite.
    """

    def __init__(self, params: Iterable[torch.Tensor], closure: Callable[[], torch.Tensor]):
        params = list(params)
        if not params:
            raise ValueError("params is empty; pass the tensors to differentiate (e.g. model.parameters())")
        for p in params:
            if not (isinstance(p, torch.Tensor) and p.is_floating_point() and p.requires_grad):
                what = f"a {p.dtype} tensor with requires_grad={p.requires_grad}" if isinstance(p, torch.Tensor) \
                    else type(p).__name__
                raise TypeError(f"params must be floating-point tensors that require grad, got {what}")
        super().__init__(**self.of_tensors(params))
        self._versions = [p._version for p in params]
        with torch.enable_grad(), twice_differentiable():
            loss = require_scalar_loss(closure(), "the closure's loss",
                                       hint="return the loss as a 0-dim tensor (a mean reduction), without backward")
            if not loss.requires_grad:
                raise ValueError("the closure's loss does not require grad: compute it from params with autograd "
                                 "on (not under torch.no_grad(), not from .item() or .detach())")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        self.gradient = torch.cat([p.new_zeros(p.numel(), dtype=torch.float64) if g is None
                                   else g.detach().reshape(-1).to(torch.float64) for p, g in zip(params, grads)])
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if [p._version for p in self.params] != self._versions:
            raise RuntimeError("the parameters changed in place since the closure was evaluated, so this "
                               "operator no longer describes them; build a new ClosureHessianOperator")
        out = torch.zeros(V.shape, dtype=torch.float64, device=self.device)
        if not self._live:
            return out
        leaves = [self.params[i] for i in self._live]
        offsets = self.offsets
        for j in range(V.shape[1]):
            chunks = torch.split(V[:, j], self.sizes)
            vs = [chunks[i].view_as(g).to(g.dtype) for i, g in zip(self._live, self._grads)]
            try:
                hv = torch.autograd.grad(self._grads, leaves, vs, retain_graph=True, allow_unused=True)
            except RuntimeError as err:
                reraise_explained(err, "Hessian-vector products")
            for i, h in zip(self._live, hv):
                if h is not None:
                    out[offsets[i]:offsets[i] + self.sizes[i], j] = h.reshape(-1)
        return out
