r"""Linear solves with a curvature operator: conjugate gradients and Steihaug's trust-region CG.

Both run the same truncated CG recurrence on :math:`A x = b` from :math:`x_0 = 0`
(:math:`r_0 = p_0 = b`; :math:`\alpha_k = r_k^\top r_k / p_k^\top A p_k`,
:math:`x_{k+1} = x_k + \alpha_k p_k`, :math:`r_{k+1} = r_k - \alpha_k A p_k`,
:math:`p_{k+1} = r_{k+1} + (r_{k+1}^\top r_{k+1} / r_k^\top r_k)\, p_k`), one product with A per
iteration, and stop a row when :math:`\|r_k\| \le \mathrm{tol}\,\|b\|`. They differ in what ends a
row early: :func:`cg` stops on non-positive curvature :math:`p_k^\top A p_k \le 0`; :func:`steihaug`
also stops on the trust-region boundary.

Shapes. ``A`` is anything with ``shape``, ``dtype``, ``device`` and ``@`` (a curvkit operator or a
dense tensor) and the right-hand side is one of

* ``(n,)`` with A of shape ``(n, n)``: one system; the result's per-row fields are 0-dim tensors;
* ``(B, n)`` with A of shape ``(n, n)``: B systems sharing A (one ``(n, B)`` block product per iteration);
* ``(B, n)`` with A of shape ``(B, n, n)``: B independent systems, ``A @ X`` mapping ``(B, n)`` to
  ``(B, n)`` row by row (a dense ``(B, n, n)`` tensor, or e.g. per-example input-space Hessians).

In every case the rows advance in lock-step, one (block) product per iteration, and each row stops
on its own criteria; a stopped row is frozen (its products are still computed with a zero direction
but not used). A flat problem is the ``B = 1`` case. Arithmetic is in float64 whatever ``A.dtype``;
a float32 operator limits the attainable residual to about 1e-7.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Union

import torch

from .lanczos import apply as matmat_float64
from .lanczos import check_operator
from .results import SolveResult

Radius = Union[float, torch.Tensor]
Rows = Callable[[torch.Tensor], torch.Tensor]


def cg(A: Any, b: torch.Tensor, max_iter: int = 100, tol: float = 1e-8, damping: float = 0.0) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\, x = b` by conjugate gradients, stopping on non-positive curvature.

    A is symmetric; for a positive-definite :math:`A + \lambda I` the iterates minimise
    :math:`q(x) = \tfrac12 x^\top (A + \lambda I) x - b^\top x` over growing Krylov spaces and
    ``x`` converges to the solution. When an iteration meets a direction with
    :math:`p_k^\top (A + \lambda I) p_k \le 0`, the row stops with ``negative_curvature=True`` and
    returns the last iterate :math:`x_k`, except at the first iteration (:math:`x_0 = 0`) where it
    returns :math:`x = b`, the steepest-descent direction of q at 0 (for a Newton system
    :math:`b = -g`, the negative gradient) — the rule of line-search Newton-CG (Nocedal & Wright,
    Algorithm 7.1).

    Args:
        A: a symmetric operator or dense matrix, shape ``(n, n)`` or ``(B, n, n)`` (see the module docstring).
        b: right-hand side, ``(n,)`` or ``(B, n)``.
        max_iter: at most this many iterations (products with A) per row.
        tol: a row converges when :math:`\|b - (A + \lambda I) x\| \le \mathrm{tol}\,\|b\|`.
        damping: :math:`\lambda`, added to A's diagonal (Levenberg-Marquardt damping).

    Returns:
        A :class:`SolveResult` in float64 on A's device: ``x`` shaped like b; ``residual`` (relative),
        ``iterations``, ``negative_curvature`` and ``converged`` (residual tolerance met) per row.

    Raises:
        TypeError: A is not square or b is not a floating-point tensor.
        ValueError: b's shape does not match A, b is not finite, or max_iter, tol, damping are invalid.

    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> sol = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> torch.allclose(A @ sol.x, torch.tensor([1.0, 2.0], dtype=torch.float64)), int(sol.iterations)
    (True, 2)
    """
    if not (isinstance(damping, (int, float)) and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number, got {damping!r}")
    rows, b64, flat = _rows_operator(A, b, "b")
    _check_budget(max_iter, tol)
    matvec = rows if damping == 0 else (lambda X: rows(X) + damping * X)
    return _truncated_cg(matvec, b64, max_iter, tol, None, flat)


def steihaug(A: Any, g: torch.Tensor, radius: Radius, max_iter: int = 100, tol: float = 1e-8) -> SolveResult:
    r"""Steihaug's truncated CG for the trust-region sub-problem of a quadratic model.

    .. math:: \min_{\|x\| \le \Delta} \; m(x) = g^\top x + \tfrac12 x^\top A x

    CG on :math:`A x = -g` from :math:`x_0 = 0` (Nocedal & Wright, Algorithm 7.2). Its iterates grow
    in norm, so the first one to leave the region, or a direction of non-positive curvature, ends the
    row on the boundary: :math:`x = x_k + \tau p_k` with :math:`\|x\| = \Delta`, where
    :math:`\tau` solves :math:`\|p\|^2 \tau^2 + 2 x_k^\top p\, \tau + \|x_k\|^2 - \Delta^2 = 0`
    (the positive root when leaving the region; on non-positive curvature the root with the lower model
    value, which at the first iteration is :math:`x = -\Delta\, g / \|g\|`). Otherwise the row stops
    inside the region when the model's gradient :math:`\|g + A x\| \le \mathrm{tol}\,\|g\|`; for a
    positive-definite A with :math:`\|A^{-1} g\| < \Delta` that is the Newton step
    :math:`-A^{-1} g`. The model value never increases from :math:`x = 0`, and is at least the
    Cauchy point's decrease.

    Args:
        A: a symmetric operator or dense matrix, shape ``(n, n)`` or ``(B, n, n)`` (see the module docstring).
        g: the model's gradient, ``(n,)`` or ``(B, n)``.
        radius: the trust-region radius :math:`\Delta > 0`: a number, or one per row as a ``(B,)`` tensor.
        max_iter: at most this many iterations (products with A) per row.
        tol: relative tolerance on the model's gradient for an interior solution.

    Returns:
        A :class:`SolveResult` in float64 on A's device: ``x`` shaped like g; per row ``residual``
        (:math:`\|g + A x\| / \|g\|`), ``iterations``, ``negative_curvature`` and ``converged`` (True when
        the row stopped inside with the tolerance met or on the boundary, False when ``max_iter`` ran out).

    Raises:
        TypeError: A is not square or g is not a floating-point tensor.
        ValueError: g's shape does not match A, g is not finite, a radius is not positive, or
            max_iter or tol are invalid.

    >>> import torch
    >>> A = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    >>> sol = steihaug(A, torch.tensor([1.0, 0.0], dtype=torch.float64), radius=0.25)
    >>> sol.x.tolist(), bool(sol.converged)
    ([-0.25, 0.0], True)
    """
    rows, g64, flat = _rows_operator(A, g, "g")
    _check_budget(max_iter, tol)
    return _truncated_cg(rows, -g64, max_iter, tol, _radii(radius, g64), flat)


def _truncated_cg(matvec: Rows, b: torch.Tensor, max_iter: int, tol: float, radius: torch.Tensor | None,
                  flat: bool) -> SolveResult:
    """The CG recurrence on the rows of ``b`` (B, n), lock-step; Steihaug's boundary rules when ``radius`` is set.

    A row advances by ``x += step * p``, ``r -= step * A p``, where ``step`` is the CG step, a boundary
    step, ``1`` (cg's negative curvature at the first iteration: x = b) or ``0`` (later: keep x).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = _dot(r, r)
    b_norm = rr.sqrt()
    target = tol * b_norm
    active = b_norm > 0
    converged = ~active
    negative = torch.zeros_like(active)
    iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        iterations += active
        curved = pAp > 0
        alpha = torch.where(active & curved, rr / torch.where(curved, pAp, 1.0), 0.0)
        bent = active & ~curved
        if radius is None:
            step = torch.where(bent, (iterations == 1).to(b.dtype), alpha)
            boundary = torch.zeros_like(active)
        else:
            roots = _boundary_steps(x, p, radius)
            leaving = active & curved & (alpha >= roots[1])
            step = torch.where(bent, _lower_model(roots, r, p, pAp), torch.where(leaving, roots[1], alpha))
            boundary = leaving | bent
        x = x + step[:, None] * p
        r = r - step[:, None] * Ap
        rr_next = _dot(r, r)
        done = active & (rr_next.sqrt() <= target)
        negative |= bent
        converged |= done | boundary
        active &= ~(done | bent | boundary)
        beta = torch.where(active, rr_next / torch.where(active, rr, 1.0), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, 0.0)
        rr = rr_next
    residual = torch.where(b_norm > 0, rr.sqrt() / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    if flat:
        return SolveResult(x[0], residual[0], iterations[0], negative[0], converged[0])
    return SolveResult(x, residual, iterations, negative, converged)


def _boundary_steps(x: torch.Tensor, p: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Both roots :math:`\tau_- \le 0 \le \tau_+` of :math:`\|x + \tau p\| = \Delta` per row (x inside, p != 0).

    Computed without cancellation: the root of the same sign as :math:`-x^\top p` as
    :math:`(-x^\top p \pm s) / \|p\|^2`, the other from the product of the roots.
    """
    xp, pp = _dot(x, p), _dot(p, p)
    pp = torch.where(pp > 0, pp, 1.0)
    gap = (radius**2 - _dot(x, x)).clamp_min(0.0)
    s = (xp**2 + pp * gap).sqrt()
    big = torch.where(xp <= 0, -xp + s, -xp - s) / pp
    small = torch.where(big != 0, -gap / (pp * torch.where(big != 0, big, 1.0)), 0.0)
    return torch.minimum(big, small), torch.maximum(big, small)


def _lower_model(roots: tuple[torch.Tensor, torch.Tensor], r: torch.Tensor, p: torch.Tensor,
                 pAp: torch.Tensor) -> torch.Tensor:
    r"""The boundary root with the lower model value.

    Along p the model changes by :math:`m(x + \tau p) - m(x) = -\tau\, r^\top p + \tau^2 p^\top A p / 2`.
    """
    rp = _dot(r, p)
    low, high = roots
    change = [-tau * rp + 0.5 * tau**2 * pAp for tau in roots]
    return torch.where(change[0] < change[1], low, high)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


def _rows_operator(A: Any, b: Any, name: str) -> tuple[Rows, torch.Tensor, bool]:
    """Validate ``A`` and ``b``; return a float64 row product ``(B, n) -> (B, n)``, b as float64 rows, flatness."""
    if not isinstance(b, torch.Tensor) or not b.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(b).__name__}"
                        + (f" of {b.dtype}" if isinstance(b, torch.Tensor) else ""))
    shape = tuple(getattr(A, "shape", ()) or ())
    device = getattr(A, "device", b.device)
    if len(shape) == 3:
        if shape[1] != shape[2] or shape[1] == 0:
            raise TypeError(f"a batched operator must have shape (B, n, n), got {shape}")
        if b.shape != shape[:2]:
            raise ValueError(f"{name} must have shape {shape[:2]} (one row per system of A {shape}), "
                             f"got {tuple(b.shape)}")
        rows = _blockwise(A)
    else:
        n = check_operator(A)
        if b.dim() not in (1, 2) or b.shape[-1] != n:
            raise ValueError(f"{name} must have shape ({n},) or (B, {n}) for an operator of shape {shape}, "
                             f"got {tuple(b.shape)}")
        rows = _shared(A)
    b64 = b.detach().to(device=device, dtype=torch.float64).reshape(-1, b.shape[-1])
    if not torch.isfinite(b64).all():
        raise ValueError(f"{name} contains nan or inf; check how it was computed")
    return rows, b64, b.dim() == 1


def _shared(A: Any) -> Rows:
    """Rows ``X`` (B, n) to ``(A X^T)^T``: every row multiplied by the one operator."""
    return lambda X: matmat_float64(A, X.T).T


def _blockwise(A: Any) -> Rows:
    """Rows ``X`` (B, n) to ``(A_i x_i)_i`` for a ``(B, n, n)`` dense tensor or batched operator."""
    if isinstance(A, torch.Tensor):
        return lambda X: torch.bmm(A, X.to(A.dtype).unsqueeze(2)).squeeze(2).to(torch.float64)

    def rows(X: torch.Tensor) -> torch.Tensor:
        out = A @ X
        if not isinstance(out, torch.Tensor) or out.shape != X.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"a batched operator of shape {tuple(A.shape)} must map (B, n) rows to (B, n) "
                            f"with @, but {type(A).__name__} returned {got}")
        return out.to(torch.float64)

    return rows


def _check_budget(max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def _radii(radius: Radius, g: torch.Tensor) -> torch.Tensor:
    """The radius per row as a float64 (B,) tensor on g's device."""
    if isinstance(radius, torch.Tensor):
        value = radius.detach().to(device=g.device, dtype=torch.float64)
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != g.shape[0]):
            raise ValueError(f"radius must be a number or a ({g.shape[0]},) tensor (one per row), "
                             f"got shape {tuple(radius.shape)}")
    elif isinstance(radius, (int, float)) and not isinstance(radius, bool):
        value = torch.tensor(float(radius), dtype=torch.float64, device=g.device)
    else:
        raise TypeError(f"radius must be a number or a tensor, got {type(radius).__name__}")
    if not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"the trust-region radius must be positive and finite, got {radius!r}")
    return value.expand(g.shape[0]).clone()
