"""The generalised Gauss-Newton matrix J^T H_out J: the Hessian without the model's own curvature."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .._utils.borrow import LossFn, require_scalar_loss
from .._utils.targets import check_class_targets
from .model import ModelOperator, central_difference, dense, reraise_explained

_OutputHessian = Callable[[torch.Tensor], torch.Tensor]


class _Linearisation(NamedTuple):
    """Per-batch state: private leaves, the indices of those that reach the outputs, and the graphs."""

    leaves: list[torch.Tensor]
    live: list[int]
    outputs: torch.Tensor
    u: torch.Tensor
    grads: list[torch.Tensor]
    hessian_out: _OutputHessian | None
    loss: float


def _cross_entropy_hessian(loss_fn: LossFn, outputs: torch.Tensor, targets: Any) -> _OutputHessian | None:
    """H_out when ``loss_fn`` is a softmax cross-entropy whose output Hessian is diag(p) - p p^T per kept row.

    Rows whose target is ``ignore_index`` contribute nothing; the others are scaled by 1/(kept rows)
    (mean) or 1 (sum). Label smoothing keeps that Hessian (each row's target weights still sum to 1);
    class weights, soft or spatial targets do not, and take the generic route. The targets must have
    been checked (:func:`~curvkit._utils.targets.check_class_targets`).
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
    kept = targets != ignore_index
    scale = 1.0 / int(kept.sum()) if reduction == "mean" else 1.0
    if bool(kept.all()):  # one fused pass per product where curvkit's kernels are built
        return lambda u: kernels.softmax_ce_hessian_product(outputs, u, scale)
    mask = kept[:, None].to(outputs.dtype)  # a zero row of u gives a zero row of the product
    return lambda u: kernels.softmax_ce_hessian_product(outputs, u * mask, scale)


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
    and s = 1/B (mean) or 1 (sum), by :func:`curvkit.kernels.softmax_ce_hessian_product` (rows whose
    target is ignore_index are zero, and B counts the others); squared error,
    H_out u = 2 u / numel (mean) or 2 u (sum).
    Any other loss: double backward of ``loss_fn`` w.r.t. its (detached) outputs, graph built once.
    """
    z = outputs.detach()
    closed_form = _cross_entropy_hessian(loss_fn, z, targets)
    if closed_form is not None:
        return closed_form
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

    ``check=True`` (:func:`~curvkit.hessian.check`) compares the products with the GGN built from first
    derivatives only, not with the Hessian (which the GGN is not): J v as a central difference of the
    outputs, :math:`H_{\mathrm{out}} (J v)` as one of the loss gradient w.r.t. the outputs, then a plain
    vector-Jacobian product. It catches a model backward that is not differentiable w.r.t. its incoming
    gradient (the double-vjp J v needs that) and a ``loss_fn`` with a wrong double backward.

    >>> from curvkit.hessian import eigenvalues
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> G = GGNOperator(model, F.cross_entropy, (x, y))
    >>> Gv = G @ torch.randn(G.shape[0])
    >>> bool(eigenvalues(G, k=3, seed=0).values.min() >= -1e-5)     # positive semi-definite
    True
    """

    ACCEPTS_FORWARD = False

    CHECK_HINT = ("the model's backward is not differentiable w.r.t. its incoming gradient, or loss_fn is not "
                  "correctly twice differentiable in the outputs")

    def _prepare(self, batch: Any) -> _Linearisation:
        """The outputs' graph on private leaves, J^T u for a dual variable u, H_out, and the loss.

        ``live`` is empty when G_b = 0 (outputs that do not depend on the parameters, or a loss linear in them).
        """
        inputs, targets = self._pair(batch)
        leaves = [p.detach().requires_grad_() for p in self.params]
        outputs = self._outputs(leaves, inputs)
        check_class_targets(self.loss_fn, outputs, targets)
        loss = float(require_scalar_loss(self.loss_fn(outputs.detach(), targets), "loss_fn(outputs, targets)"))
        hessian_out = _output_hessian(self.loss_fn, outputs, targets) if outputs.requires_grad else None
        if hessian_out is None:
            return _Linearisation(leaves, [], outputs, None, [], None, loss)
        u = torch.zeros_like(outputs, requires_grad=True)
        grads = torch.autograd.grad(outputs, leaves, u, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None]
        return _Linearisation(leaves, live, outputs, u, [grads[i] for i in live], hessian_out, loss)

    @staticmethod
    def _pair(batch: Any) -> tuple[Any, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"GGNOperator needs batches (inputs, targets), got {type(batch).__name__}; "
                            "pass a DataLoader or a list of (inputs, targets) pairs")
        return batch[0], batch[1]

    def _outputs(self, leaves: list[torch.Tensor], inputs: Any) -> torch.Tensor:
        """The model's outputs with the selected parameters replaced by ``leaves``, checked floating and finite."""
        outputs = self._loss.evaluate(leaves, inputs)
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            kind = outputs.dtype if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise TypeError(f"the model must return a floating-point tensor of outputs, got {kind}; "
                            "wrap the model so that it returns the tensor loss_fn takes")
        if not torch.isfinite(outputs.detach()).all():
            raise FloatingPointError("the model's outputs are not finite on a batch; check the data and the model")
        return outputs

    def _difference_quotients(self, batch: Any, rows: torch.Tensor, rel_step: float, theta_norm: float
                              ) -> torch.Tensor:
        r"""J^T H_out J v from first derivatives: J v and H_out (J v) by central differences, then one backward.

        J v is the central difference of the outputs along v (step as in :meth:`finite_differences`);
        H_out (J v) that of the loss gradient w.r.t. the outputs z along J v, with step
        rel_step max(1, ||z||) / ||J v||; J^T is a plain vector-Jacobian product.
        """
        inputs, targets = self._pair(batch)
        leaves = [p.detach().requires_grad_() for p in self.params]
        outputs = self._outputs(leaves, inputs)
        check_class_targets(self.loss_fn, outputs, targets)
        z = outputs.detach()
        z_norm = float(torch.linalg.vector_norm(z.double()))
        out = []
        for v in rows:
            norm = float(torch.linalg.vector_norm(v))
            if norm == 0 or not outputs.requires_grad:
                out.append(torch.zeros_like(v))
                continue
            jv = central_difference(functools.partial(self._shifted_outputs, inputs, self.split(v)), theta_norm,
                                    norm, rel_step)
            jv_norm = float(torch.linalg.vector_norm(jv.double()))
            if jv_norm == 0:
                out.append(torch.zeros_like(v))
                continue
            w = central_difference(functools.partial(self._output_gradient, z, targets, jv), z_norm, jv_norm, rel_step)
            grads = torch.autograd.grad(outputs, leaves, w, retain_graph=True, allow_unused=True)
            out.append(self._flat(grads, v))
        return torch.stack(out)

    def _shifted_outputs(self, inputs: Any, pieces: list[torch.Tensor], t: float) -> torch.Tensor:
        with torch.no_grad():
            return self._outputs(self._shifted(pieces, t), inputs)

    def _output_gradient(self, z: torch.Tensor, targets: Any, direction: torch.Tensor, t: float) -> torch.Tensor:
        """The gradient of ``loss_fn`` w.r.t. the outputs at ``z + t direction``."""
        shifted = (z + t * direction.to(z.dtype)).requires_grad_()
        loss = require_scalar_loss(self.loss_fn(shifted, targets), "loss_fn(outputs, targets)")
        return torch.autograd.grad(loss, shifted)[0] if loss.requires_grad else torch.zeros_like(shifted)

    def _product(self, state: _Linearisation, v: torch.Tensor) -> torch.Tensor | None:
        """J_b^T H_out J_b v: J v by a double vector-Jacobian product, H_out, then one backward."""
        if not state.live:
            return None
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
            blocks[i].copy_(dense(g).reshape(-1))
        return out
