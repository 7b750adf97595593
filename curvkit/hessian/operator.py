r"""Curvature operators: symmetric n x n linear maps defined by products, never stored densely.

The protocol every algorithm in :mod:`curvkit.hessian` relies on is small: ``shape``, ``dtype``,
``device`` and ``@``. A dense tensor satisfies it, which is how the tests check every algorithm
against exact answers. :class:`CurvatureOperator` is the base of curvkit's own operators; it needs
only the sizes of the blocks it acts on (parameters are optional), and it composes:

.. math:: (H + cI) v, \qquad (aH) v, \qquad D H D v \ (D \text{ diagonal})

via :class:`AffineOperator` (``H.shift(c)``, ``a * H``) and :class:`DiagonalSandwich`, each again an operator
(damped Newton systems and trust-region sub-problems need the first, preconditioned sharpness the last).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn


def matmat_float64(H: Any, V: torch.Tensor) -> torch.Tensor:
    """``H @ V`` in float64 for an operator or a dense tensor of any floating dtype.

    A single column goes through ``H @ v`` (operators serve one vector with less overhead).

    Args:
        H: an operator with ``@`` or a dense square tensor.
        V: an ``(n, k)`` block.

    Returns:
        The ``(n, k)`` float64 product.
    """
    if isinstance(H, torch.Tensor):
        return (H @ V.to(H.dtype)).to(torch.float64)
    if V.dim() == 2 and V.shape[1] == 1:
        return (H @ V[:, 0]).to(torch.float64)[:, None]
    return (H @ V).to(torch.float64)


def operator_eps(H: Any) -> float:
    """Machine epsilon of the arithmetic ``H``'s products are computed in."""
    return torch.finfo(H.dtype).eps


def check_operator(H: Any) -> int:
    """Validate that ``H`` is square with ``shape``, ``dtype`` and ``@``.

    Returns:
        The size n of the ``(n, n)`` operator.

    Raises:
        TypeError: ``H`` is not a square operator.
        ValueError: ``H`` is empty.
    """
    shape = getattr(H, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(f"expected a square operator with .shape, .dtype and @, got {type(H).__name__} {shape}")
    if shape[0] == 0:
        raise ValueError("the operator is empty (n = 0)")
    return int(shape[0])


class CurvatureOperator(ABC):
    """Base class of curvkit's operators: ``shape``, ``dtype``, ``device``, a product counter and ``@``.

    Subclasses implement ``_matmat(V)`` for an ``(n, k)`` block and return it in float64.
    ``H @ v`` accepts a flat ``(n,)`` vector, an ``(n, k)`` block, or a list of tensors shaped like
    ``H.params``; the result has the same form (and ``v``'s dtype). ``matvecs`` counts products.

    Args:
        sizes: the number of coordinates of each block (e.g. of each parameter).
        dtype: the dtype the products are computed in.
        device: where the products are computed.
        params: the tensors the blocks belong to (optional: lists of tensors need them for their shapes).
        names: a name per block (optional).

    Raises:
        ValueError: ``sizes`` is empty, has a negative entry, or disagrees with ``params``/``names``.
    """

    def __init__(self, sizes: Sequence[int], dtype: torch.dtype, device: torch.device | str, *,
                 params: Sequence[torch.Tensor] = (), names: Sequence[str] | None = None):
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or any(s < 0 for s in self.sizes):
            raise ValueError(f"sizes must be a non-empty list of non-negative block sizes, got {list(sizes)}")
        self.params: list[nn.Parameter] = list(params)
        self.param_names = [] if names is None else list(names)
        if (self.params and [p.numel() for p in self.params] != self.sizes) or (
                self.param_names and len(self.param_names) != len(self.sizes)):
            raise ValueError("params and names must have one entry per block of sizes")
        n = sum(self.sizes)
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0

    @classmethod
    def of_tensors(cls, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The base's keyword arguments for operators over ``tensors``: sizes, promoted dtype, device, params."""
        tensors = list(tensors)
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return {"sizes": [t.numel() for t in tensors], "dtype": dtype, "device": tensors[0].device,
                "params": tensors}

    @property
    def offsets(self) -> list[int]:
        """Where each block starts in a flat vector (``offsets[i]`` for block ``param_names[i]``)."""
        return np.cumsum([0, *self.sizes[:-1]]).tolist()

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for an ``(n, k)`` block, returned in float64."""

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat ``(n,)`` vector into views shaped like ``self.params`` (flat pieces without params)."""
        chunks = torch.split(v, self.sizes)
        if not self.params:
            return list(chunks)
        return [c.view_as(p) for c, p in zip(chunks, self.params)]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like ``self.params`` (or of the block sizes) into one flat vector.

        Raises:
            TypeError: an entry is not a tensor.
            ValueError: the tensors do not match the blocks.
        """
        shapes = [tuple(p.shape) for p in self.params] if self.params else [(s,) for s in self.sizes]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"H @ v needs a tensor or a list of tensors, got a list of "
                            f"{sorted({type(t).__name__ for t in tensors})}")
        if len(tensors) != len(shapes) or any(tuple(t.shape) != s for t, s in zip(tensors, shapes)):
            raise ValueError(f"expected {len(shapes)} tensors shaped like H.params {shapes}, "
                             f"got {[tuple(t.shape) for t in tensors]}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return self.split(self @ self.flatten(v))
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"H @ v needs a tensor or a list of tensors, got {type(v).__name__}")
        n = self.shape[0]
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise ValueError(f"H @ v needs v of shape ({n},) or ({n}, k); got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"H @ v needs a floating-point v, got {v.dtype}")
        if v.dim() == 1:
            out = self._matvec(v.to(self.device))
        else:
            out = self._matmat(v.to(self.device)) if v.shape[1] else v.new_zeros(n, 0, dtype=torch.float64)
        self.matvecs += 1 if v.dim() == 1 else v.shape[1]
        return out.to(v.dtype)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for one flat vector (operators with a cheaper single product override this)."""
        return self._matmat(v[:, None])[:, 0]

    def shift(self, c: float) -> AffineOperator:
        """The operator ``H + c I`` (a damped or regularised system)."""
        return AffineOperator(self, shift=c)

    def __mul__(self, a: float) -> AffineOperator:
        if not isinstance(a, (int, float)) or isinstance(a, bool):
            return NotImplemented
        return AffineOperator(self, scale=a)

    __rmul__ = __mul__

    def __neg__(self) -> AffineOperator:
        return AffineOperator(self, scale=-1.0)

    def to_scipy(self) -> LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric)."""
        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64), device=self.device)
            return (self @ V).cpu().numpy()

        return LinearOperator(self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat,
                              dtype=np.float64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.shape[0]}, blocks={len(self.sizes)}, dtype={self.dtype}, "
                f"device={self.device}, matvecs={self.matvecs})")


class _Composed(CurvatureOperator):
    """An operator built from another one (an operator or a dense tensor): same blocks, own product counter."""

    def __init__(self, H: Any):
        n = check_operator(H)
        if isinstance(H, CurvatureOperator):
            super().__init__(H.sizes, H.dtype, H.device, params=H.params, names=H.param_names)
        else:
            super().__init__([n], H.dtype, H.device)
        self.H = H

    @property
    def distributed(self) -> bool:
        """Whether the inner operator's products are all-reduced over torch.distributed ranks."""
        return getattr(self.H, "distributed", False)

    @property
    def single_batch(self) -> bool:
        """Whether the inner operator serves every product from one cached state (blocks then save nothing)."""
        return getattr(self.H, "single_batch", True)

    @property
    def max_block(self) -> int:
        """The inner operator's largest block of products per data pass."""
        return getattr(self.H, "max_block", 16)


class AffineOperator(_Composed):
    r"""``a H + c I``: the operator ``H`` scaled by ``a`` and shifted by ``c`` times the identity.

    ``H.shift(c)`` and ``a * H`` build it; a damped Newton system is ``H.shift(damping)``.

    >>> D = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> (AffineOperator(D, scale=2.0, shift=0.5) @ torch.ones(2, dtype=torch.float64)).tolist()
    [2.5, 4.5]

    Args:
        H: a square operator or dense tensor.
        scale: the factor a.
        shift: the shift c.
    """

    def __init__(self, H: Any, scale: float = 1.0, shift: float = 0.0):
        super().__init__(H)
        self.scale, self.c = float(scale), float(shift)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(torch.float64)
        out = matmat_float64(self.H, V)
        if self.scale != 1.0:
            out = out.mul_(self.scale)
        return out.add_(V, alpha=self.c) if self.c else out


class DiagonalSandwich(_Composed):
    r"""``D H D`` for a diagonal ``D = diag(d)``: symmetric whenever ``H`` is.

    Args:
        H: a square operator or dense tensor.
        d: the flat diagonal of D (length n), any floating dtype; used in float64.

    Raises:
        ValueError: ``d`` does not have shape ``(n,)``.
    """

    def __init__(self, H: Any, d: torch.Tensor):
        super().__init__(H)
        n = self.shape[0]
        if not isinstance(d, torch.Tensor) or d.shape != (n,):
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"the diagonal must be a tensor of shape ({n},), got {shape}")
        self.d = d.detach().to(device=self.device, dtype=torch.float64)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        d = self.d[:, None]
        return d * matmat_float64(self.H, d * V.to(torch.float64))
