"""Extreme eigenvalues of a curvature operator by Lanczos, stopped on Ritz residuals."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .._utils.progress import progress_bar
from .._utils.random import Seed, gaussian, make_generator
from .lanczos import Lanczos
from .operator import check_operator, operator_eps
from .results import EigResult

WHICH = ("LA", "SA", "LM")


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def error_bounds(theta: np.ndarray, resid: np.ndarray) -> np.ndarray:
    r"""Error bound per Ritz value: min(r, r^2 / gap), the gap measured to the other Ritz values.

    |lambda - theta| <= r always holds; r^2 / gap is the sharper (Kato-Temple) bound once the
    Ritz value is separated from the rest of the spectrum by ``gap``.
    """
    bounds = resid.copy()
    if theta.size > 1:
        dist = np.abs(theta[:, None] - theta[None, :])
        np.fill_diagonal(dist, np.inf)
        gap = np.min(dist - resid[None, :], axis=1)
        sharp = np.where(gap > resid, resid**2 / np.maximum(gap, 1e-300), resid)
        bounds = np.minimum(bounds, sharp)
    return bounds


def _check_args(n: int, k: int, which: str, tol: float, max_matvecs: int | None) -> int:
    """Validate the arguments of :func:`eigenvalues`; return the product budget."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator size n={n}; use a dense eigensolver for all of them")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    budget = min(n, 100 + 20 * k) if max_matvecs is None else int(max_matvecs)
    if budget < k + 1:
        raise ValueError(f"max_matvecs={max_matvecs} is too small for k={k}: Lanczos needs at least k+1 products")
    return min(budget, n)


def _start_vector(H: Any, n: int, seed: Seed, v0: torch.Tensor | None) -> torch.Tensor:
    """The (n, 1) float64 start vector: ``v0``, or a Gaussian one from ``seed``."""
    if v0 is None:
        return gaussian(n, 1, make_generator(seed, shared=getattr(H, "distributed", False)), H.device)
    if v0.shape != (n,) or not bool(v0.abs().sum() > 0):
        raise ValueError(f"v0 must be a non-zero vector of shape ({n},), got shape {tuple(v0.shape)}")
    return v0.to(device=H.device, dtype=torch.float64).reshape(n, 1)


def eigenvalues(H: Any, k: int = 1, which: str = "LA", tol: float = 1e-6, max_matvecs: int | None = None,
                seed: Seed = None, progress: bool | None = None, v0: torch.Tensor | None = None,
                basis_dtype: torch.dtype = torch.float64) -> EigResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
    Stops when every requested Ritz value's error bound min(r, r^2/gap), with Ritz residual
    r = ||H y - theta y||, is below ``tol * |theta|`` (or the products' own rounding level), or
    when ``max_matvecs`` products are spent (then ``converged=False`` and a warning).
    ``v0`` warm-starts the recurrence (e.g. with the previous top eigenvector while training).

    >>> H = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    >>> res = eigenvalues(H, k=2, tol=1e-12, seed=0)
    >>> [round(v, 8) for v in res.values.tolist()], res.converged
    ([20.0, 19.0], True)

    Args:
        H: a symmetric operator (or dense tensor).
        k: how many eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        tol: the relative error bound every requested value must reach.
        max_matvecs: the product budget (default min(n, 100 + 20 k)).
        seed: an int, a ``torch.Generator`` or None for the start vector.
        progress: show a progress bar (None: when stderr is a terminal).
        v0: a start vector of shape (n,) instead of a random one.
        basis_dtype: ``torch.float32`` stores the Lanczos vectors in half the memory (accuracy then
            limited near 1e-7 relative to the spectrum's scale); the arithmetic stays float64.

    Returns:
        An :class:`~curvkit.hessian.results.EigResult` (values, vectors, residuals, converged, matvecs).

    Raises:
        ValueError: bad ``which``, ``k``, ``tol``, ``max_matvecs`` or ``v0``.
        TypeError: ``H`` is not a square operator.
    """
    n = check_operator(H)
    budget = _check_args(n, k, which, tol, max_matvecs)
    start = _start_vector(H, n, seed, v0)
    lanczos = Lanczos(H, start, budget, basis_dtype)
    floor = 10 * operator_eps(H)
    converged = False
    with progress_bar(total=budget, desc="lanczos", enable=progress) as bar:
        while not lanczos.done:
            lanczos.step()
            bar.update(1)
            if lanczos.steps < k:
                continue
            theta, S, resid = lanczos.ritz()
            wanted = _order(theta, which)[:k]
            bounds = error_bounds(theta, resid)[wanted]
            scale = np.maximum(tol * np.abs(theta[wanted]), floor * np.abs(theta).max())
            converged = bool(np.all(bounds <= scale)) or not bool(lanczos.active[0])
            if converged:
                break
    theta, S, resid = lanczos.ritz()
    wanted = _order(theta, which)[:k]
    if not converged:
        warnings.warn(
            f"eigenvalues: the {k} requested Ritz values did not reach tol={tol} within {lanczos.steps} products "
            f"(error bounds {error_bounds(theta, resid)[wanted]}); raise max_matvecs or tol",
            RuntimeWarning, stacklevel=2,
        )
    return EigResult(
        values=torch.as_tensor(theta[wanted].copy()),
        vectors=lanczos.vectors(S[:, wanted]),
        residuals=torch.as_tensor(resid[wanted].copy()),
        converged=converged,
        matvecs=lanczos.steps,
    )
