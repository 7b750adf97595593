"""The generalised Gauss-Newton matrix J^T H_out J: the Hessian without the model's own curvature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .._utils.borrow import LossFn, require_scalar_loss
from .model import ModelOperator, reraise_explained

_OutputHessian = Callable[[torch.Tensor], torch.Tensor]


class _Linearisation(NamedTuple):
    """Per-batch state: private leaves, the indices of those that reach the outputs, and the graphs."""

    leaves: list[torch.Tensor]
    live: list[int]
    outputs: torch.Tensor
    u: torch.Tensor
    grads: list[torch.Tensor]
    hessian_out: _OutputHessian


def _cross_entropy_scale(loss_fn: LossFn, outputs: torch.Tensor, targets: Any) -> float | None:
    """1/B or 1 when ``loss_fn`` is a softmax cross-entropy whose output Hessian is diag(p) - p p^T per row.

    Label smoothing keeps that Hessian (each row's target weights still sum to 1); class weights,
    ignored targets, soft or spatial targets do not, and take the generic route.
    """
    if loss_fn is F.cross_entropy:
        reduction, ignore_index = "mean", -100
    elif type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction in ("mean", "sum"):
        reduction, ignore_index = loss_fn.reduction, loss_fn.ignore_index
    else:
        return None
    if not (isinstance(targets, torch.Tensor) and outputs.dim() == 2 and targets.dim() == 1
            and not targets.is_floating_point() and len(targets) == len(outputs)):
        return None
    if bool((targets == ignore_index).any()):
        return None
    return 1.0 / len(outputs) if reduction == "mean" else 1.0


def _mse_scale(loss_fn: LossFn, outputs: torch.Tensor, targets: Any) -> float | None:
    """2/numel or 2 when ``loss_fn`` is a mean or summed squared error with targets shaped like the outputs."""
    if loss_fn is F.mse_loss:
        reduction = "mean"
    elif type(loss_fn) is nn.MSELoss and loss_fn.reduction in ("mean", "sum"):
        reduction = loss_fn.reduction
    else:
        return None
    if not (isinstance(targets, torch.Tensor) and targets.shape == outputs.shape):
        return None
    return 2.0 / outputs.numel() if reduction == "mean" else 2.0


def _output_hessian(loss_fn: LossFn, outputs: torch.Tensor, targets: Any) -> _OutputHessian | None:
    r"""``u -> H_out u`` with H_out = d^2 loss_fn(z, targets) / dz^2 at z = ``outputs`` (None if H_out = 0).

    Closed forms: softmax cross-entropy, H_out u = s (p * u - p (p . u)) per row with p = softmax(z)
    and s = 1/B (mean) or 1 (sum), by :func:`curvkit.kernels.softmax_ce_hessian_product`; squared error,
    H_out u = 2 u / numel (mean) or 2 u (sum).
    Any other loss: double backward of ``loss_fn`` w.r.t. its (detached) outputs, graph built once.
    """
    z = outputs.detach()
    scale = _cross_entropy_scale(loss_fn, z, targets)
    if scale is not None:  # one fused pass per product where curvkit's kernels are built
        return lambda u: kernels.softmax_ce_hessian_product(z, u, scale)
    scale = _mse_scale(loss_fn, z, targets)
    if scale is not None:
        return lambda u: scale * u
    z.requires_grad_()
    loss = require_scalar_loss(loss_fn(z, targets), "loss_fn(outputs, targets)")
    if not loss.requires_grad:
        return None
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    if not grad.requires_grad:  # the loss is linear in the outputs
        return None
    return lambda u: torch.autograd.grad(grad, z, u, retain_graph=True)[0]


class GGNOperator(ModelOperator):
    r"""Generalised Gauss-Newton matrix of the data-averaged loss w.r.t. (a block of) the model's parameters.

    .. math:: G = \sum_b \frac{n_b}{N} J_b^\top H_{\mathrm{out},b} J_b, \qquad
              J_b = \frac{\partial f_\theta(x_b)}{\partial \theta}, \quad
              H_{\mathrm{out},b} = \frac{\partial^2 \ell(z, y_b)}{\partial z^2}\Big|_{z = f_\theta(x_b)}

    G drops the term of the Hessian that carries the model's second derivatives; it is positive
    semi-definite whenever the loss is convex in the outputs (cross-entropy, squared error), and
    equals the Hessian for a model linear in its parameters. A product is J v (double-vjp:
    J v = d/du (J^T u) . v on the cached graph, cheaper than ``torch.func.jvp``, which reruns the
    forward pass), then H_out (closed form for cross-entropy
    and squared error, double backward of ``loss_fn`` otherwise), then J^T. On one batch the outputs'
    graph is built once for all products.

    ``data`` is one batch ``(inputs, targets)`` or a re-iterable of such batches, weighted by sample
    count; ``loss_fn(outputs, targets)`` must return a scalar. Data loop, BatchNorm modes, ``max_block``
    and torch.distributed behave as in :class:`HessianOperator`. The model is never mutated.

    >>> from curvkit.hessian import eigenvalues
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> G = GGNOperator(model, F.cross_entropy, (x, y))
    >>> Gv = G @ torch.randn(G.shape[0])
    >>> bool(eigenvalues(G, k=5, seed=0).values.min() > -1e-5)     # positive semi-definite
    True
    """

    ACCEPTS_FORWARD = False

    def _prepare(self, batch: Any) -> _Linearisation | None:
        """The outputs' graph on private leaves, J^T u for a dual variable u, and H_out (None if G_b = 0)."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"GGNOperator needs batches (inputs, targets), got {type(batch).__name__}; "
                            "pass a DataLoader or a list of (inputs, targets) pairs")
        inputs, targets = batch
        leaves = [p.detach().requires_grad_() for p in self.params]
        outputs = self._loss.evaluate(leaves, inputs)
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            kind = outputs.dtype if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise TypeError(f"the model must return a floating-point tensor of outputs, got {kind}; "
                            "wrap the model so that it returns the tensor loss_fn takes")
        if not torch.isfinite(outputs.detach()).all():
            raise FloatingPointError("the model's outputs are not finite on a batch; check the data and the model")
        if not outputs.requires_grad:
            return None
        hessian_out = _output_hessian(self.loss_fn, outputs, targets)
        if hessian_out is None:
            return None
        u = torch.zeros_like(outputs, requires_grad=True)
        grads = torch.autograd.grad(outputs, leaves, u, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None]
        return _Linearisation(leaves, live, outputs, u, [grads[i] for i in live], hessian_out)

    def _products(self, state: _Linearisation | None, rows: torch.Tensor) -> torch.Tensor | None:
        if state is None or not state.live:
            return None
        return torch.stack([self._product(state, v) for v in rows])

    def _product(self, state: _Linearisation, v: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(v, self.sizes)
        vs = [chunks[i].view_as(state.leaves[i]).to(state.leaves[i].dtype) for i in state.live]
        try:
            (jv,) = torch.autograd.grad(state.grads, state.u, vs, retain_graph=True)
        except RuntimeError as err:
            reraise_explained(err, "GGN products (J v differentiates the model's backward pass)")
        live_leaves = [state.leaves[i] for i in state.live]
        jtw = torch.autograd.grad(state.outputs, live_leaves, state.hessian_out(jv), retain_graph=True)
        out = v.new_zeros(v.shape[0])
        blocks = torch.split(out, self.sizes)
        for i, g in zip(state.live, jtw):
            blocks[i].copy_(g.reshape(-1))
        return out
