"""A symmetrically preconditioned operator D^-1/2 H D^-1/2 for a positive diagonal D."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from .lanczos import apply, check_operator
from .operator import CurvatureOperator

Diagonal = Union[torch.Tensor, Sequence[torch.Tensor]]


class PreconditionedOperator(CurvatureOperator):
    r"""The symmetric operator :math:`D^{-1/2} H D^{-1/2}` for a symmetric H and a positive diagonal D.

    Its eigenvalues are those of the (non-symmetric) :math:`D^{-1} H`, since
    :math:`D^{-1} H = D^{-1/2} (D^{-1/2} H D^{-1/2}) D^{1/2}` is a similarity; being symmetric, it can
    be handed to Lanczos (``eigenvalues``, ``density``, ``trace``), which :math:`D^{-1} H` cannot.
    This is the preconditioned sharpness of adaptive optimizers (Cohen et al. 2022): for Adam,
    D = P_t = (1 - b1^t) diag(sqrt(v_t / (1 - b2^t)) + eps).

    ``H`` is any square operator with ``shape``, ``dtype``, ``device`` and ``@`` (a curvkit operator
    or a dense tensor); ``diag`` is a flat tensor of length n, or a list of tensors shaped like
    ``H.params``. ``params`` and ``param_names`` are those of ``H`` (empty for a dense tensor);
    ``matvecs`` counts the products with this operator.

    >>> P = PreconditionedOperator(HessianOperator(model, F.cross_entropy, (x, y)), adam_diagonal)
    >>> sharpness = eigenvalues(P, k=1).values[0]
    >>> P @ torch.randn(P.shape[0])
    """

    def __init__(self, H: Any, diag: Diagonal):
        n = check_operator(H)
        params = list(getattr(H, "params", []))
        if params:
            super().__init__(params, getattr(H, "param_names", []))
        else:
            self.params, self.param_names, self._sizes, self.matvecs = [], [], [], 0
        self.shape, self.dtype, self.device = (n, n), H.dtype, H.device
        self.H = H
        self.scale = self._diagonal(diag, n).rsqrt()

    def _diagonal(self, diag: Diagonal, n: int) -> torch.Tensor:
        """``diag`` as a flat float64 tensor on the operator's device, checked positive and finite."""
        if isinstance(diag, (list, tuple)):
            if not self.params:
                raise ValueError("a list diagonal needs an operator with .params; pass a flat tensor of length "
                                 f"{n} for {type(self.H).__name__}")
            diag = self.flatten(diag)
        if not isinstance(diag, torch.Tensor) or not diag.is_floating_point():
            kind = diag.dtype if isinstance(diag, torch.Tensor) else type(diag).__name__
            raise TypeError(f"diag must be a floating-point tensor of length {n} or a list of tensors shaped like "
                            f"H.params, got {kind}")
        if diag.shape != (n,):
            raise ValueError(f"diag must have shape ({n},) to match the operator, got {tuple(diag.shape)}; "
                             "flatten it in parameter order or pass a list shaped like H.params")
        diag = diag.detach().to(device=self.device, dtype=torch.float64)
        bad = ~(torch.isfinite(diag) & (diag > 0))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"diag must be positive and finite, but {int(bad.sum())} of {n} entries are not "
                             f"(entry {i} is {float(diag[i])}); add a positive epsilon, as Adam's eps does")
        return diag

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        s = self.scale[:, None]
        return s * apply(self.H, s * V.to(torch.float64))
