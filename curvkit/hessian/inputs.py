"""Hessian-vector products of each example's loss w.r.t. its own input."""

from __future__ import annotations

import torch
from torch import nn

from .._utils.borrow import BorrowedLoss, LossFn
from .model import reraise_explained


def _example_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[loss_fn(outputs[i:i+1], targets[i:i+1]) for i]`` as a (B,) tensor, in one vmapped call when possible.

    vmap is much faster than a loop over examples; losses it cannot batch (data-dependent shapes,
    e.g. a weighted cross-entropy with label smoothing) are evaluated one example at a time.
    """
    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(o[None], t[None])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn on one example must return a scalar, got {shape}; use reduction='mean' "
                             "or 'sum' (input_hvp applies it to one example at a time)")
        return loss.reshape(())

    try:
        losses = torch.func.vmap(one)(outputs, targets)
    except RuntimeError:  # vmap cannot batch this loss; a genuine error recurs in the loop
        losses = torch.stack([one(o, t) for o, t in zip(outputs.unbind(), targets.unbind())])
    bad = ~torch.isfinite(losses.detach())
    if bad.any():
        raise FloatingPointError(
            f"the loss of example(s) {bad.nonzero().flatten().tolist()[:10]} alone is not finite "
            "(a target equal to ignore_index has no loss of its own); drop those examples"
        )
    return losses


def input_hvp(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, *,
              bn_mode: str = "eval", return_grad: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Per-example Hessian-vector products w.r.t. the inputs: row i is :math:`H_i v_i`.

    .. math:: H_i = \frac{\partial^2 \ell_i}{\partial x_i^2}, \qquad
              \ell_i = \mathrm{loss\_fn}(f(x_{i:i+1}), y_{i:i+1})

    :math:`\ell_i` is example i's own loss (``loss_fn`` applied to that example alone, so a mean
    reduction does not divide by the batch size). With ``bn_mode="eval"`` the examples do not
    interact, the Hessian of :math:`\sum_i \ell_i` w.r.t. all inputs is block diagonal, and one
    double backward gives every :math:`H_i v_i`. ``bn_mode="batch"`` normalises with the batch's
    statistics, which couples the examples: the result is then that Hessian (with its off-diagonal
    blocks) times v. With ``return_grad=True`` also returns the gradients :math:`\partial \ell_i / \partial x_i`.
    The model is never mutated; Dropout active in train mode is refused.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> v = torch.randn(64, 4)
    >>> hv = input_hvp(model, F.cross_entropy, x, y, v)
    >>> hv, g = input_hvp(model, F.cross_entropy, x, y, v, return_grad=True)
    >>> curvature = (v * hv).flatten(1).sum(1)  # v_i^T H_i v_i per example
    >>> curvature.shape
    torch.Size([64])
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() == 0:
        raise TypeError("inputs must be a floating-point tensor with a leading batch dimension (the Hessian w.r.t. "
                        "integer inputs such as token ids does not exist; differentiate w.r.t. embeddings instead)")
    if not isinstance(v, torch.Tensor) or v.shape != inputs.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v must be a tensor shaped like inputs {tuple(inputs.shape)}, got {shape}")
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or len(targets) != len(inputs):
        raise ValueError(f"targets must be a tensor with one row per example ({len(inputs)})")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(outputs, targets) -> scalar")
    named = list(model.named_parameters())
    borrowed = BorrowedLoss(model, None, [n for n, _ in named], bn_mode=bn_mode,
                            forward=lambda m, batch: _example_losses(loss_fn, m(batch[0]), batch[1]).sum())
    x = inputs.detach().requires_grad_()
    loss = borrowed([p.detach() for _, p in named], (x, targets))
    (grad,) = torch.autograd.grad(loss, x, create_graph=True, allow_unused=True)
    if grad is None or not grad.requires_grad:  # the loss does not reach, or is linear in, the inputs
        hv = torch.zeros_like(inputs)
    else:
        try:
            (hv,) = torch.autograd.grad(grad, x, v.to(grad.dtype))
        except RuntimeError as err:
            reraise_explained(err, "input Hessian-vector products")
    if not return_grad:
        return hv.detach()
    return hv.detach(), (torch.zeros_like(inputs) if grad is None else grad.detach())
