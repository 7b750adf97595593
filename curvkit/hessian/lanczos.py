"""Lanczos tridiagonalisation with full reorthogonalisation, for a block of independent start vectors.

For a symmetric H and unit q_0, m steps give an orthonormal basis Q_m and a tridiagonal
T_m = Q_m^T H Q_m (diagonal ``alpha``, off-diagonal ``beta``) with
H Q_m = Q_m T_m + beta_m q_m e_m^T. The eigenpairs (theta, s) of T_m are Ritz pairs with
residual ||H Q_m s - theta Q_m s|| = |beta_m s_m|. Every new vector is orthogonalised twice
against the whole basis ("twice is enough"), so no ghost eigenvalues appear.

All start vectors in a block advance in lock-step: each step is one ``H @ V`` over the block,
which lets dataset operators build each batch's graph once per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


def apply(H: Any, V: torch.Tensor) -> torch.Tensor:
    """``H @ V`` in float64 for an operator or a dense tensor of any floating dtype."""
    if isinstance(H, torch.Tensor):
        return (H @ V.to(H.dtype)).to(torch.float64)
    return (H @ V).to(torch.float64)


def operator_eps(H: Any) -> float:
    """Machine epsilon of the arithmetic the products are computed in."""
    return torch.finfo(H.dtype).eps


def check_operator(H: Any) -> int:
    """Validate that ``H`` is square with ``shape``, ``dtype`` and ``@``; return its size."""
    shape = getattr(H, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(f"expected a square operator with .shape, .dtype and @, got {type(H).__name__} {shape}")
    if shape[0] == 0:
        raise ValueError("the operator is empty (n = 0)")
    return int(shape[0])


class Lanczos:
    """Lanczos recurrences started from the columns of ``V0`` (shape ``(n, b)``), run in lock-step.

    Call :meth:`step` repeatedly; a column stops when its Krylov space becomes invariant
    (``beta`` ~ 0, its tridiagonal is then exact) or after ``max_steps`` steps.
    """

    def __init__(self, H: Any, V0: torch.Tensor, max_steps: int):
        n, b = V0.shape
        self.H = H
        self.max_steps = min(max_steps, n)
        device = V0.device
        self.basis = torch.zeros(self.max_steps + 1, n, b, dtype=torch.float64, device=device)
        self.basis[0] = V0 / V0.norm(dim=0)
        self.alpha = torch.zeros(b, self.max_steps, dtype=torch.float64)
        self.beta = torch.zeros(b, self.max_steps, dtype=torch.float64)
        self.length = torch.zeros(b, dtype=torch.long)
        self.active = torch.ones(b, dtype=torch.bool)
        self.steps = 0
        self._scale = 0.0
        self._breakdown = 100 * operator_eps(H)

    @property
    def done(self) -> bool:
        return self.steps >= self.max_steps or not bool(self.active.any())

    def step(self) -> None:
        """One Lanczos step for every active column (one product per active column)."""
        j = self.steps
        cols = self.active.nonzero().flatten()
        q = self.basis[j][:, cols]
        w = apply(self.H, q)
        alpha = (q * w).sum(0)
        previous = self.basis[: j + 1][:, :, cols]
        for _ in range(2):
            w -= torch.einsum("jna,ja->na", previous, torch.einsum("jna,na->ja", previous, w))
        beta = w.norm(dim=0)
        self._scale = max(self._scale, float(alpha.abs().max()), float(beta.max()))
        self.alpha[cols, j] = alpha.cpu()
        self.beta[cols, j] = beta.cpu()
        self.length[cols] = j + 1
        self.steps = j + 1
        broke = beta <= self._breakdown * max(self._scale, 1e-300)
        self.basis[j + 1][:, cols] = torch.where(broke, torch.zeros_like(w), w / beta.clamp_min(1e-300))
        self.active[cols[broke.cpu()]] = False
        self.beta[cols[broke.cpu()], j] = 0.0

    def ritz(self, col: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of T, and residual norms for column ``col``."""
        m = int(self.length[col])
        a = self.alpha[col, :m].numpy()
        b = self.beta[col, :m].numpy()
        theta, S = eigh_tridiagonal(a, b[: m - 1])
        return theta, S, np.abs(b[m - 1] * S[m - 1, :])

    def vectors(self, S: np.ndarray, col: int = 0) -> torch.Tensor:
        """Ritz vectors ``Q_m S`` for column ``col`` (``S`` from :meth:`ritz`)."""
        m = int(self.length[col])
        coeffs = torch.as_tensor(S, dtype=torch.float64, device=self.basis.device)
        return self.basis[:m, :, col].T @ coeffs
