"""Hessians w.r.t. the inputs: of each example's own loss (or any per-example scalar of the outputs)."""

from __future__ import annotations

import torch
from torch import nn

from .._utils.borrow import BN_MODES, BorrowedLoss, LossFn
from .._utils.targets import check_class_targets
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
                             "or 'sum' (it is applied to one example at a time)")
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


class InputHessianOperator:
    r"""Per-example Hessians w.r.t. the inputs of a scalar function of each example's outputs.

    .. math:: H_i = \frac{\partial^2 f_i}{\partial x_i^2}, \qquad
              f_i = \mathrm{fn}(\mathrm{model}(x_{i:i+1}), \mathrm{targets}_{i:i+1})

    ``fn(outputs, targets)`` returns a scalar for one example: a loss (a mean reduction does not
    divide by the batch size, since it sees one example), or e.g. an attack's logit margin
    ``lambda z, t: z[0, t[0, 0]] - z[0, t[0, 1]]``. The forward pass and the input-gradient graph are
    built once, here; every product reuses them (one double backward for the whole batch). With
    ``bn_mode="eval"`` the examples do not interact: the operator is a batch of B independent
    :math:`n \times n` blocks, ``shape == (B, n, n)``, and ``H @ V`` maps rows ``(B, n)`` (or a tensor
    shaped like ``inputs``) to :math:`(H_i v_i)_i` in the same form, which ``cg``/``steihaug`` solve
    row by row. ``bn_mode="batch"`` normalises with the batch's statistics, which couples the
    examples: H is then the Hessian of :math:`\sum_i f_i` w.r.t. all inputs, ``shape == (Bn, Bn)``,
    and ``H @ v`` takes a flat ``(Bn,)`` vector (or one shaped like ``inputs``).

    ``values`` (B,), ``gradient`` (:math:`\partial f_i / \partial x_i`, shaped like ``inputs``) and
    ``outputs`` are the forward and first backward at ``inputs``, detached; ``matvecs`` counts
    products (each gives every example one). The model is never mutated; Dropout active in train
    mode is refused.

    Args:
        model: the network, borrowed (parameters, buffers, modes and ``.grad`` are left as they are).
        fn: ``fn(outputs, targets) -> scalar`` for one example (outputs and targets with a leading 1).
        inputs: floating-point tensor with a leading batch dimension.
        targets: a tensor with one row per example, passed to ``fn``.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics, examples coupled).

    Raises:
        TypeError: ``inputs`` is not floating point or ``fn`` is not callable.
        ValueError: ``targets`` does not have one row per example, or ``fn`` does not return a scalar.
        FloatingPointError: some example's value is not finite.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> H = InputHessianOperator(model, torch.nn.functional.cross_entropy, x, y)
    >>> H.shape, (H @ torch.ones(5, 3, dtype=torch.float64)).shape, H.values.shape
    ((5, 3, 3), torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(self, model: nn.Module, fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *,
                 bn_mode: str = "eval"):
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() == 0:
            raise TypeError("inputs must be a floating-point tensor with a leading batch dimension (the Hessian "
                            "w.r.t. integer inputs such as token ids does not exist; differentiate w.r.t. "
                            "embeddings instead)")
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or len(targets) != len(inputs):
            raise ValueError(f"targets must be a tensor with one row per example ({len(inputs)})")
        if not callable(fn):
            raise TypeError("fn must be a callable fn(outputs, targets) -> scalar for one example")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        named = list(model.named_parameters())
        borrowed = BorrowedLoss(model, None, [n for n, _ in named], bn_mode=bn_mode, forward=lambda m, x: m(x))
        self._x = inputs.detach().requires_grad_()
        outputs = borrowed.evaluate([p.detach() for _, p in named], self._x)
        check_class_targets(fn, outputs, targets)
        values = _example_losses(fn, outputs, targets)
        (grad,) = torch.autograd.grad(values.sum(), self._x, create_graph=True, allow_unused=True)
        self._grad = grad if grad is not None and grad.requires_grad else None  # None: H = 0
        self.values = values.detach()
        self.outputs = outputs.detach()
        self.gradient = torch.zeros_like(inputs) if grad is None else grad.detach()
        batch, n = len(inputs), inputs[0].numel()
        self.shape = (batch, n, n) if bn_mode == "eval" else (batch * n, batch * n)
        self._rows = (batch, n) if bn_mode == "eval" else (batch * n,)
        self.dtype = inputs.dtype
        self.device = inputs.device
        self.matvecs = 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        if not isinstance(V, torch.Tensor) or not V.is_floating_point():
            raise TypeError(f"H @ V needs a floating-point tensor, got {type(V).__name__}")
        if V.shape not in (self._x.shape, self._rows):
            raise ValueError(f"H @ V needs V of shape {self._rows} or shaped like the inputs "
                             f"{tuple(self._x.shape)}, got {tuple(V.shape)}")
        self.matvecs += 1
        if self._grad is None:  # the function does not reach, or is linear in, the inputs
            return torch.zeros(V.shape, dtype=V.dtype, device=self.device)
        try:
            (hv,) = torch.autograd.grad(self._grad, self._x, V.to(self.device, self._grad.dtype).view_as(self._x),
                                        retain_graph=True, allow_unused=True)
        except RuntimeError as err:
            reraise_explained(err, "input Hessian-vector products")
        if hv is None:
            return torch.zeros(V.shape, dtype=V.dtype, device=self.device)
        return hv.reshape(V.shape).to(V.dtype)

    def __repr__(self) -> str:
        return (f"InputHessianOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"matvecs={self.matvecs})")


def input_hvp(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, *,
              bn_mode: str = "eval", return_grad: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Per-example Hessian-vector products w.r.t. the inputs: row i is :math:`H_i v_i` (one-shot).

    .. math:: H_i = \frac{\partial^2 \ell_i}{\partial x_i^2}, \qquad
              \ell_i = \mathrm{loss\_fn}(f(x_{i:i+1}), y_{i:i+1})

    One product with an :class:`InputHessianOperator` (build the operator instead to reuse its
    graph for many products). :math:`\ell_i` is example i's own loss, so a mean reduction does not
    divide by the batch size. ``bn_mode="batch"`` normalises with the batch's statistics, which
    couples the examples: the result is then the Hessian of :math:`\sum_i \ell_i` w.r.t. all inputs
    (with its off-diagonal blocks) times v. With ``return_grad=True`` also returns the gradients
    :math:`\partial \ell_i / \partial x_i`. The model is never mutated; Dropout active in train mode is refused.

    Args:
        model: the network, borrowed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, applied to one example at a time.
        inputs: floating-point tensor with a leading batch dimension.
        targets: a tensor with one row per example.
        v: the directions, shaped like ``inputs``.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics).
        return_grad: also return the per-example input gradients.

    Returns:
        The products shaped like ``inputs`` (and the gradients with ``return_grad=True``).

    Raises:
        ValueError: ``v`` is not shaped like ``inputs`` (and the errors of :class:`InputHessianOperator`).

    .. code-block:: python

        hv = input_hvp(model, F.cross_entropy, x, y, v)
        hv, g = input_hvp(model, F.cross_entropy, x, y, v, return_grad=True)
        curvature = (v * hv).flatten(1).sum(1)  # v_i^T H_i v_i per example
    """
    if not isinstance(v, torch.Tensor) or not isinstance(inputs, torch.Tensor) or v.shape != inputs.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        want = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else "?"
        raise ValueError(f"v must be a tensor shaped like inputs {want}, got {shape}")
    H = InputHessianOperator(model, loss_fn, inputs, targets, bn_mode=bn_mode)
    hv = H @ v.to(inputs.dtype)
    return (hv, H.gradient) if return_grad else hv
