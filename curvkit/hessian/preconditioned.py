"""A symmetrically preconditioned operator D^-1/2 H D^-1/2 for a positive diagonal D."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from .operator import DiagonalSandwich, check_operator

Diagonal = Union[torch.Tensor, Sequence[torch.Tensor]]


class PreconditionedOperator(DiagonalSandwich):
    r"""The symmetric operator :math:`D^{-1/2} H D^{-1/2}` for a symmetric H and a positive diagonal D.

    Its eigenvalues are those of the (non-symmetric) :math:`D^{-1} H`, since
    :math:`D^{-1} H = D^{-1/2} (D^{-1/2} H D^{-1/2}) D^{1/2}` is a similarity; being symmetric, it can
    be handed to Lanczos (``eigenvalues``, ``density``, ``trace``), which :math:`D^{-1} H` cannot.
    This is the preconditioned sharpness of adaptive optimizers (Cohen et al. 2022): for Adam,
    :math:`D = P_t = (1 - \beta_1^t)\,\mathrm{diag}(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon)`.

    ``params`` and ``param_names`` are those of ``H`` (one anonymous block for a dense tensor);
    ``matvecs`` counts the products with this operator.

    .. code-block:: python

        P = PreconditionedOperator(HessianOperator(model, F.cross_entropy, (x, y)), adam_diagonal)
        sharpness = eigenvalues(P, k=1).values[0]

    Args:
        H: any square operator with ``shape``, ``dtype``, ``device`` and ``@`` (a curvkit operator or a
            dense tensor).
        diag: D as a flat tensor of length n, or a list of tensors shaped like ``H.params``.

    Raises:
        TypeError: ``diag`` is not a floating-point tensor (or list of them).
        ValueError: ``diag`` has the wrong shape, or an entry that is not positive and finite.
    """

    def __init__(self, H: Any, diag: Diagonal):
        n = check_operator(H)
        params = list(getattr(H, "params", []))
        if isinstance(diag, (list, tuple)):
            if not params:
                raise ValueError("a list diagonal needs an operator with .params; pass a flat tensor of length "
                                 f"{n} for {type(H).__name__}")
            diag = H.flatten(diag)
        super().__init__(H, _positive_diagonal(diag, n, H.device).rsqrt())

    @property
    def scale(self) -> torch.Tensor:
        """The flat diagonal of :math:`D^{-1/2}`."""
        return self.d


def _positive_diagonal(diag: Any, n: int, device: torch.device) -> torch.Tensor:
    """``diag`` as a flat float64 tensor on ``device``, checked positive and finite."""
    if not isinstance(diag, torch.Tensor) or not diag.is_floating_point():
        kind = diag.dtype if isinstance(diag, torch.Tensor) else type(diag).__name__
        raise TypeError(f"diag must be a floating-point tensor of length {n} or a list of tensors shaped like "
                        f"H.params, got {kind}")
    if diag.shape != (n,):
        raise ValueError(f"diag must have shape ({n},) to match the operator, got {tuple(diag.shape)}; "
                         "flatten it in parameter order or pass a list shaped like H.params")
    diag = diag.detach().to(device=device, dtype=torch.float64)
    bad = ~(torch.isfinite(diag) & (diag > 0))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"diag must be positive and finite, but {int(bad.sum())} of {n} entries are not "
                         f"(entry {i} is {float(diag[i])}); add a positive epsilon, as Adam's eps does")
    return diag
