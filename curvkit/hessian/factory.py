"""Model operators by name, so consumers take ``operator="hessian" | "ggn" | factory``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from torch import nn

from .ggn import GGNOperator
from .hessian import HessianOperator

OPERATORS: dict[str, Callable[..., Any]] = {"hessian": HessianOperator, "ggn": GGNOperator}
OperatorSpec = Union[str, Callable[..., Any]]


def build_operator(operator: OperatorSpec, model: nn.Module, loss_fn: Any, data: Any, **kwargs: Any) -> Any:
    """The curvature operator ``operator`` of ``model``'s loss over ``data``.

    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> build_operator("ggn", model, F.cross_entropy, (x, y)).shape
    (8, 8)

    Args:
        operator: ``"hessian"``, ``"ggn"``, or a factory ``operator(model, loss_fn, data, **kwargs)``
            (an operator class such as :class:`~curvkit.hessian.HessianOperator` is one) returning an
            operator with ``shape``, ``dtype``, ``device`` and ``@``.
        model: the model (borrowed, never mutated).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: one batch or a re-iterable of batches.
        **kwargs: passed to the factory (``params``, ``bn_mode``, ``max_block``, ...).

    Returns:
        The operator.

    Raises:
        ValueError: an unknown operator name.
        TypeError: ``operator`` is neither a name nor callable.
    """
    if isinstance(operator, str):
        if operator not in OPERATORS:
            raise ValueError(f"operator must be one of {tuple(OPERATORS)} or a factory "
                             f"operator(model, loss_fn, data, **kwargs), got {operator!r}")
        operator = OPERATORS[operator]
    if not callable(operator):
        raise TypeError(f"operator must be a name in {tuple(OPERATORS)} or a callable factory, "
                        f"got {type(operator).__name__}")
    return operator(model, loss_fn, data, **kwargs)
