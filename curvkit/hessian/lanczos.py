"""Lanczos tridiagonalisation with full reorthogonalisation, for a block of independent start vectors.

For a symmetric H and unit q_0, m steps give an orthonormal basis Q_m and a tridiagonal
T_m = Q_m^T H Q_m (diagonal ``alpha``, off-diagonal ``beta``) with
H Q_m = Q_m T_m + beta_m q_m e_m^T. The eigenpairs (theta, s) of T_m are Ritz pairs with
residual ||H Q_m s - theta Q_m s|| = |beta_m s_m|. After the three-term recurrence every new vector is
orthogonalised against the whole basis, and once more when that pass cancelled more than 1 - 1/sqrt(2)
of its norm (Daniel, Gragg, Kaufman & Stewart's criterion; "twice is enough"), so no ghost eigenvalues
appear.

All start vectors in a block advance in lock-step: each step is one ``H @ V`` over the block,
which lets dataset operators build each batch's graph once per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dstevd

from .operator import matmat_float64, operator_eps

CHUNK_BYTES = 32 * 2**20   # the basis grows in chunks of 4 vectors, or of as many as fit in 32 MiB if more
REPEAT_BELOW = 2 ** -0.5   # reorthogonalise a second time when the first pass removed more than this share


class Lanczos:
    """Lanczos recurrences started from the columns of ``V0`` (shape ``(n, b)``), run in lock-step.

    Call :meth:`step` repeatedly; a recurrence stops when its Krylov space becomes invariant
    (``beta`` ~ 0, its tridiagonal is then exact) or after ``max_steps`` steps. The basis grows as
    the recurrence runs, in chunks of ``(b, k, n)`` (k = 4 vectors for large n, more while a chunk
    stays under 32 MiB), so a run of m steps holds its m + 1 vectors and at most 3 unused ones (or under
    32 MiB of them), whatever ``max_steps`` allows; reorthogonalisation is two batched matrix products per chunk.
    ``basis_dtype=torch.float32`` halves the basis memory; the Lanczos vectors are then orthonormal to
    float32 precision only, which bounds the attainable accuracy near 1e-7 relative to ||H||.
    The scalars live on the host: a step moves its ``(3, b)`` inner products there in one transfer (the
    reorthogonalisation test needs them anyway) and does its bookkeeping in numpy rather than in tiny tensors.

    Args:
        H: a symmetric operator (or dense tensor).
        V0: the start vectors, one column per recurrence (normalised here).
        max_steps: the most steps (products per recurrence); capped at n.
        basis_dtype: the dtype the Lanczos vectors are stored in (the arithmetic is float64).

    Attributes:
        alpha: ``(b, max_steps)`` float64 numpy array, the diagonals of the tridiagonals (zero past ``length``).
        beta: ``(b, max_steps)`` float64 numpy array, their off-diagonals (``beta[:, m - 1]`` is beta_m).
        length: ``(b,)`` the steps each recurrence has taken.
        active: ``(b,)`` bool, the recurrences still running.
    """

    def __init__(self, H: Any, V0: torch.Tensor, max_steps: int, basis_dtype: torch.dtype = torch.float64):
        n = V0.shape[0]
        if basis_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"basis_dtype must be torch.float64 or torch.float32, got {basis_dtype}")
        self.H = H
        self.max_steps = min(max_steps, n)
        self.basis_dtype = basis_dtype
        rows = V0.T.to(torch.float64)
        self._rows = rows.shape[0]
        vector_bytes = max(self._rows * n * torch.finfo(basis_dtype).bits // 8, 1)
        self._chunk = max(4, min(self.max_steps + 1, CHUNK_BYTES // vector_bytes))
        self._chunks: list[torch.Tensor] = []
        self.stored = 0
        self._append(rows * self._spread(self._dot(rows, rows).rsqrt()))
        r = self.recurrences
        self.alpha = np.zeros((r, self.max_steps))
        self.beta = np.zeros((r, self.max_steps))
        self.length = np.zeros(r, dtype=np.int64)
        self.active = np.ones(r, dtype=bool)
        self._beta_last = None
        self.steps = 0
        self._scale = 0.0
        self._breakdown = 100 * operator_eps(H)

    @property
    def recurrences(self) -> int:
        """The number of recurrences run in lock-step."""
        return self._rows

    def _append(self, q: torch.Tensor) -> None:
        """Store the next Lanczos vectors ``(b, n)``, allocating a chunk when the last one is full."""
        k = self.stored % self._chunk
        if k == 0:
            capacity = min(self._chunk, self.max_steps + 1 - self.stored)
            self._chunks.append(q.new_empty(q.shape[0], capacity, q.shape[1], dtype=self.basis_dtype))
        self._chunks[-1][:, k] = q
        self.stored += 1

    def _blocks(self, stop: int):
        """The stored vectors ``0 .. stop - 1`` as float64 blocks ``(b, k, n)``, one chunk at a time."""
        for i, chunk in enumerate(self._chunks):
            start = i * self._chunk
            if start >= stop:
                return
            yield chunk[:, : stop - start].to(torch.float64)

    def _vector(self, j: int) -> torch.Tensor:
        """Lanczos vectors ``j`` of every recurrence, ``(b, n)`` in float64."""
        return self._chunks[j // self._chunk][:, j % self._chunk].to(torch.float64)

    def _reorthogonalise(self, w: torch.Tensor, stop: int) -> None:
        """Classical Gram-Schmidt of ``w`` against the stored vectors ``0 .. stop - 1``, a chunk at a time."""
        for block in self._blocks(stop):
            w -= self._combine(block, self._dot(block, w))

    def _basis_times(self, col: int, m: int, coeffs: torch.Tensor) -> torch.Tensor:
        """``Q_m[col] coeffs``: the first m vectors of recurrence ``col`` (as columns) times ``(m, k)`` coeffs."""
        out, start = None, 0
        for block in self._blocks(m):
            k = block.shape[1]
            part = block[col].T @ coeffs[start:start + k]
            out = part if out is None else out + part
            start += k
        return out

    def _dot(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Inner products per recurrence: ``(b, j, n) x (b, n) -> (b, j)`` or ``(b, n) x (b, n) -> (b,)``."""
        if A.dim() == 3:
            return torch.bmm(A, B.unsqueeze(2)).squeeze(2)
        return (A * B).sum(1)

    def _spread(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Per-recurrence scalars ``(b,)`` as a factor for the vectors ``(b, n)``."""
        return coeffs.unsqueeze(1)

    def _combine(self, basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """sum_j coeffs[:, j] basis[:, j] per recurrence: ``(b, j, n) x (b, j) -> (b, n)``."""
        return torch.bmm(coeffs.unsqueeze(1), basis).squeeze(1)

    @property
    def done(self) -> bool:
        """Whether every recurrence has stopped (invariant subspace or ``max_steps``)."""
        return self.steps >= self.max_steps or not self.active.any()

    def step(self) -> None:
        """One Lanczos step of every recurrence (one product per row of the basis)."""
        j = self.steps
        q = self._vector(j)
        w = matmat_float64(self.H, q.T).T.contiguous()
        alpha = self._dot(q, w)
        w -= q * self._spread(alpha)                       # the three-term recurrence ...
        if j > 0:
            w -= self._vector(j - 1) * self._spread(self._beta_last)
        before = self._dot(w, w)
        self._reorthogonalise(w, j + 1)                    # ... then full reorthogonalisation
        after = self._dot(w, w)
        alpha, before, after = torch.stack([alpha, before, after]).cpu().numpy()  # the step's one transfer
        if (after < REPEAT_BELOW**2 * before).any():          # cancellation: once more ("twice is enough")
            self._reorthogonalise(w, j + 1)
            after = self._dot(w, w).cpu().numpy()
        beta = np.sqrt(after)
        active = self.active
        self._scale = max(self._scale, float(np.abs(alpha).max()), float(beta.max()))
        broke = active & (beta <= self._breakdown * max(self._scale, 1e-300))
        keep = active & ~broke
        self.alpha[:, j] = np.where(active, alpha, 0)
        self.beta[:, j] = np.where(keep, beta, 0)
        self.length[active] = j + 1
        factors = np.stack([self.beta[:, j], np.where(keep, 1 / np.maximum(beta, 1e-300), 0)])
        self._beta_last, inverse = torch.as_tensor(factors, device=w.device)
        self._append(w * self._spread(inverse))
        self.active = keep
        self.steps = j + 1

    def ritz(self, col: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of T, and residual norms for recurrence ``col``.

        Calls LAPACK's ``dstevd`` (the driver of scipy's ``eigh_tridiagonal``) directly: the wrapper's
        checks cost more than the decomposition of the small tridiagonals of a convergence test.

        Args:
            col: the recurrence.

        Returns:
            ``(theta, S, resid)``: the eigenvalues of T_m (ascending), its eigenvectors as the columns of
            ``S`` ``(m, m)``, and the Ritz residual norms ``|beta_m S[m - 1, i]|``.

        Raises:
            numpy.linalg.LinAlgError: the decomposition did not converge.
        """
        m = int(self.length[col])
        b = self.beta[col, :m]
        theta, S, info = dstevd(self.alpha[col, :m], b[: max(m - 1, 1)])
        if info != 0:
            raise np.linalg.LinAlgError(f"dstevd failed to converge (info={info}) on a Lanczos tridiagonal of size {m}")
        return theta, S, np.abs(b[m - 1] * S[m - 1, :])

    def vectors(self, S: np.ndarray, col: int = 0) -> torch.Tensor:
        """Ritz vectors ``Q_m S`` for recurrence ``col`` (``S`` from :meth:`ritz`)."""
        m = int(self.length[col])
        return self._basis_times(col, m, torch.as_tensor(S, dtype=torch.float64, device=self._chunks[0].device))


class SegmentedLanczos(Lanczos):
    """One Lanczos recurrence per segment of a single vector, for a block-diagonal operator.

    ``segments[i]`` is the block of coordinate i (or -1 for none). With ``H`` block diagonal in
    those segments, each segment evolves independently, so G recurrences cost one length-n
    basis vector per step instead of G.
    """

    def __init__(self, H: Any, v0: torch.Tensor, segments: torch.Tensor, max_steps: int,
                 basis_dtype: torch.dtype = torch.float64):
        self.segments = segments.to(v0.device)
        self.n_segments = int(segments.max()) + 1
        self._mask = (self.segments >= 0).to(torch.float64)
        self._index = self.segments.clamp_min(0)
        sizes = torch.bincount(self._index[self.segments >= 0], minlength=self.n_segments)
        super().__init__(H, (v0.reshape(-1) * self._mask)[:, None], min(max_steps, int(sizes.max())), basis_dtype)

    @property
    def recurrences(self) -> int:
        """One recurrence per segment."""
        return self.n_segments

    def _dot(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        prod = (A * B * self._mask)[0]
        out = prod.new_zeros(*prod.shape[:-1], self.n_segments).index_add_(-1, self._index, prod)
        return out.T if out.dim() == 2 else out

    def _spread(self, coeffs: torch.Tensor) -> torch.Tensor:
        return (coeffs[self._index] * self._mask)[None]

    def _combine(self, basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        return (basis[0] * coeffs[self._index].T).sum(0, keepdim=True) * self._mask

    def vectors(self, S: np.ndarray, col: int = 0) -> torch.Tensor:
        """Ritz vectors of segment ``col``, zero outside it."""
        m = int(self.length[col])
        coeffs = torch.as_tensor(S, dtype=torch.float64, device=self._chunks[0].device)
        return self._basis_times(0, m, coeffs) * (self.segments == col).to(torch.float64)[:, None]
