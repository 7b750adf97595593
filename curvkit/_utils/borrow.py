"""Borrowing a model: parameter selection, module modes, and a loss that never mutates the model.

The loss is evaluated with ``torch.func.functional_call`` on detached copies of the selected
parameters (our own autograd leaves), so the model's ``.grad`` and ``requires_grad`` are never
touched; BatchNorm modules are switched to the requested mode only for the duration of a forward
pass and buffers are replaced by private copies, so running statistics never change.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .targets import check_class_targets

try:  # torch >= 2.3: pick the twice-differentiable (math) attention kernel during curvature forwards
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def twice_differentiable():
        """Select kernels whose backward is itself differentiable (fused attention kernels are not).

        A context manager: run a forward whose gradient will be differentiated again inside it, e.g.
        ``with twice_differentiable(): loss = loss_fn(model(x), y)`` before ``loss.backward(create_graph=True)``.
        """
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover - older torch
    def twice_differentiable():
        """A no-op on torch versions whose attention has no fused kernels to avoid."""
        return nullcontext()

_DOUBLE_BACKWARD_HINTS = ("differentiate", "not implemented", "double backward", "once_differentiable")


def lacks_double_backward(err: BaseException) -> bool:
    """Whether autograd's error says an operation has no derivative of its backward (no double backward)."""
    return any(h in str(err) for h in _DOUBLE_BACKWARD_HINTS)

ParamSpec = Union[None, str, nn.Parameter, Iterable[Union[str, nn.Parameter]]]
LossFn = Callable[[Any, Any], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], torch.Tensor]

BN_MODES = ("eval", "batch")


def select_parameters(model: nn.Module, params: ParamSpec) -> tuple[list[str], list[nn.Parameter]]:
    """Resolve ``params`` (None, names/globs, or Parameters) to ``(names, parameters)`` in model order."""
    named = list(model.named_parameters())
    if params is None:
        chosen = {n for n, p in named if p.requires_grad}
        if not chosen:
            raise ValueError(
                "the model has no trainable parameters (none with requires_grad=True); "
                "pass params=[...] (names, globs or Parameters) to choose the block to analyse"
            )
    else:
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        by_id = {id(p): n for n, p in named}
        chosen = set()
        for item in params:
            if isinstance(item, str):
                hits = [n for n, _ in named if fnmatch.fnmatchcase(n, item)]
                if not hits:
                    sample = ", ".join(n for n, _ in named[:6])
                    raise ValueError(f"params pattern {item!r} matches no parameter; names look like: {sample}")
                chosen.update(hits)
            elif isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise ValueError(f"a tensor of shape {tuple(item.shape)} in params is not a parameter of the model")
                chosen.add(by_id[id(item)])
            else:
                raise TypeError(f"params entries must be names, glob patterns or Parameters, got {type(item).__name__}")
        if not chosen:
            raise ValueError("params selects no parameter; pass at least one name, glob or Parameter")
    names = [n for n, _ in named if n in chosen]
    tensors = [p for n, p in named if n in chosen]
    if any(not p.is_floating_point() for p in tensors):
        raise TypeError("only floating-point parameters have a Hessian")
    return names, tensors


def require_scalar_loss(loss: Any, what: str, hint: str = "use a mean reduction (e.g. reduction='mean')"
                        ) -> torch.Tensor:
    """``loss`` as a 0-d tensor after checking that it is a finite scalar tensor.

    Raises:
        ValueError: ``loss`` is not a tensor with exactly one element (the message names ``what`` and ``hint``).
        FloatingPointError: ``loss`` is NaN or infinite.
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{what} must be a scalar tensor, got {shape}; {hint}")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"{what} is {loss.item()} on a batch; check the data and the model")
    return loss.reshape(())


def require_materialised(model: nn.Module) -> None:
    """Refuse a model with a parameter or buffer on the ``meta`` device (a shape without values).

    Raises:
        ValueError: naming the first such tensor and how to materialise the model.
    """
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise ValueError(
                    f"the model's {kind} {name!r} is on the meta device: it has a shape but no values, so there is "
                    "nothing to differentiate or evaluate; materialise the model first, e.g. "
                    "model.to_empty(device='cpu') followed by model.load_state_dict(state_dict)"
                )


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every module of ``model`` on exit, whatever happens inside."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _default_forward(loss_fn: LossFn) -> ForwardFn:
    def forward(model: nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                "each batch must be a pair (inputs, targets); for other batch structures pass "
                "forward=lambda model, batch: loss"
            )
        inputs, targets = batch
        outputs = model(inputs)
        check_class_targets(loss_fn, outputs, targets)
        return loss_fn(outputs, targets)

    return forward


class _Borrowed(nn.Module):
    """Wraps model and loss so ``functional_call`` swaps parameters for the whole computation."""

    def __init__(self, model: nn.Module, forward: ForwardFn):
        super().__init__()
        self.model = model
        self.compute = forward

    def forward(self, batch: Any) -> torch.Tensor:
        return self.compute(self.model, batch)


class BorrowedLoss:
    """``loss(leaves, batch)``: the model's loss with the selected parameters replaced by ``leaves``.

    Never mutates the model: BatchNorm modes are set only during the call and restored, buffers are
    private copies, and Dropout active in train mode is refused (it would make the Hessian random), as
    is a model on the meta device. The default forward takes ``(inputs, targets)`` pairs and checks
    class-index targets of cross-entropy and NLL losses (:func:`~curvkit._utils.targets.check_class_targets`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, names: list[str], *,
                 forward: ForwardFn | None = None, bn_mode: str = "eval"):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if forward is None:
            if loss_fn is None or not callable(loss_fn):
                raise TypeError("loss_fn must be a callable loss_fn(outputs, targets) -> scalar (or pass forward=)")
            forward = _default_forward(loss_fn)
        require_materialised(model)
        for name, module in model.named_modules():
            if isinstance(module, _DropoutNd) and module.training and module.p > 0:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}, p={module.p}) is active in train mode, which makes "
                    "the Hessian random; call model.eval() first (curvkit never changes your model's mode for you)"
                )
        self.model = model
        self.bn_mode = bn_mode
        self._wrapped = _Borrowed(model, forward)
        self._names = ["model." + n for n in names]
        self._buffers = {"model." + n: b.detach().clone() for n, b in model.named_buffers()}

    @contextmanager
    def _bn_mode(self):
        bns = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        saved = [m.training for m in bns]
        try:
            for m in bns:
                m.train(self.bn_mode == "batch")
            yield
        finally:
            for m, mode in zip(bns, saved):
                m.train(mode)

    def evaluate(self, leaves: Sequence[torch.Tensor], batch: Any) -> Any:
        """``forward(model, batch)`` with the selected parameters replaced by ``leaves``, unchecked."""
        tensors = dict(zip(self._names, leaves))
        tensors.update(self._buffers)
        with self._bn_mode(), twice_differentiable():
            return functional_call(self._wrapped, tensors, (batch,), strict=False)

    def __call__(self, leaves: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        """The loss on ``batch`` with the selected parameters replaced by ``leaves``, checked scalar and finite."""
        return require_scalar_loss(self.evaluate(leaves, batch), "the loss")
