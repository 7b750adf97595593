r"""Stochastic trace and diagonal estimation with honest error bars.

Hutchinson: for Rademacher z, E[z^T H z] = tr H with variance 2 sum_{i != j} H_ij^2 per probe.
XTrace (Epperly, Tropp & Webber 2024) spends products on a sketch Q of range(H Omega) and
averages, over each test vector omega_i, the exchangeable estimate
tr(Q_i^T H Q_i) + omega_i^T (I - P_i) H (I - P_i) omega_i, where Q_i spans H Omega without
column i; it wins when a few large eigenvalues hold most of ||H||_F^2 and loses when the
Frobenius mass is spread out. Hutch++ (Meyer et al. 2021) is the non-exchangeable variant.
``method="auto"`` measures that share on a pilot and picks XTrace or Hutchinson.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from scipy.stats import t as student_t

from ._progress import progress_bar
from ._random import Seed, make_generator, rademacher
from .lanczos import apply, check_operator, operator_eps
from .results import DiagResult, TraceResult

METHODS = ("auto", "hutchinson", "hutch++", "xtrace")
PILOT = 10          # probes before the first stopping decision (enough for a usable standard error)
BLOCK = 10          # first probe block; blocks double up to the operator's max_block (one data pass each)
DEFAULT_TRACE_BUDGET = 1000
DEFAULT_DIAG_BUDGET = 100
LOW_RANK_SHARE = 0.25   # auto: XTrace when a rank-5 sketch leaves less than this share of ||H||_F^2


class _Products:
    """Counts products against a budget, advances the progress bar, and sizes probe blocks.

    Blocks start at ``BLOCK`` probes and double up to the operator's ``max_block``, so a dataset
    operator builds each batch's graph once per block while stopping checks stay frequent early.
    """

    def __init__(self, H: Any, budget: int, bar):
        self.H, self.budget, self.used, self.bar = H, budget, 0, bar
        self._block = BLOCK

    @property
    def left(self) -> int:
        return self.budget - self.used

    def next_block(self) -> int:
        """Size of the next probe block (within the budget)."""
        size = min(self._block, self.left)
        if not getattr(self.H, "single_batch", True):
            self._block = min(2 * self._block, self.H.max_block)
        return size

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.used += V.shape[1]
        self.bar.update(V.shape[1])
        return apply(self.H, V)


def _mean_and_error(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    return mean, (float(samples.std()) / math.sqrt(m) if m > 1 else math.inf)


def _reached(samples: torch.Tensor, rtol: float) -> bool:
    mean, se = _mean_and_error(samples)
    return samples.numel() >= 2 and se <= rtol * abs(mean)


def _result(estimate: float, stderr: float, dof: int, matvecs: int, method: str, rtol: float) -> TraceResult:
    half = 0.0 if stderr == 0 else float(student_t.ppf(0.975, max(dof, 1))) * stderr
    converged = stderr <= rtol * abs(estimate)
    return TraceResult(estimate, stderr, (estimate - half, estimate + half), matvecs, method, converged)


def _exact_diagonal(products: _Products, n: int) -> torch.Tensor:
    """diag(H) from products with unit vectors, a block at a time."""
    device = products.H.device
    diag = torch.empty(n, dtype=torch.float64, device=device)
    for start in range(0, n, BLOCK):
        rows = torch.arange(start, min(start + BLOCK, n), device=device)
        cols = torch.arange(rows.numel(), device=device)
        E = torch.zeros(n, rows.numel(), dtype=torch.float64, device=device)
        E[rows, cols] = 1.0
        diag[rows] = products(E)[rows, cols]
    return diag


def _hutchinson(products: _Products, gen, samples: torch.Tensor, rtol: float) -> torch.Tensor:
    """Add Rademacher probes z^T H z, a block at a time, until ``rtol`` or the budget is reached."""
    n = products.H.shape[0]
    while products.left > 0 and not _reached(samples, rtol):
        Z = rademacher(n, products.next_block(), gen, products.H.device)
        samples = torch.cat([samples, (Z * products(Z)).sum(0).cpu()])
    return samples


def _hutchinson_needs_more_than(samples: torch.Tensor, rtol: float, n: int) -> bool:
    """Whether Hutchinson, at the pilot's variance, would need at least ``n`` probes to reach ``rtol``."""
    if _reached(samples, rtol):
        return False
    mean, se = _mean_and_error(samples)
    std = se * math.sqrt(samples.numel())
    return mean == 0 or (std / (rtol * abs(mean))) ** 2 >= n


def _residual_share(Z: torch.Tensor, HZ: torch.Tensor) -> float:
    """Share of ||H||_F^2 that a sketch from half the pilot leaves, measured on the other half."""
    half = Z.shape[1] // 2
    Q, _ = torch.linalg.qr(HZ[:, :half])
    test = HZ[:, half:]
    rest = test - Q @ (Q.T @ test)
    return float(rest.square().sum() / test.square().sum().clamp_min(1e-300))


def _extend_basis(products: _Products, Q: torch.Tensor, Z: torch.Tensor, Y_new: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Orthonormal Q spanning [Q, Y_new] and Z = H Q; ``captured`` when Y_new is rank deficient.

    For random test vectors, rank [Y, Y_new] < its column count only if it already equals rank H;
    then span Q = range H almost surely and tr H = tr(Q^T H Q) exactly.
    """
    R = Y_new.clone()
    for _ in range(2):
        R -= Q @ (Q.T @ R)
    U, sv, _ = torch.linalg.svd(R, full_matrices=False)
    keep = sv > 1e3 * eps * float(Y_new.norm(dim=0).max())
    Q_add = U[:, keep]
    if Q_add.shape[1]:
        Q, Z = torch.cat([Q, Q_add], 1), torch.cat([Z, products(Q_add)], 1)
    return Q, Z, Q_add.shape[1] < Y_new.shape[1]


def _xtrace_samples(Omega: torch.Tensor, Y: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    r"""The exchangeable estimates t_i, computed from small s x s matrices.

    With Y = Q R, the basis of H Omega without column i is Q U_i, where U_i U_i^T = I - s_i s_i^T
    and s_i is the normalised i-th column of R^{-T}. Then tr(Q_i^T H Q_i) = tr(K) - s_i^T K s_i
    (K = Q^T H Q) and, with p_i = (I - s_i s_i^T) Q^T omega_i,
    omega_i^T (I-P_i) H (I-P_i) omega_i = omega_i^T H omega_i - 2 (Z^T omega_i)^T p_i + p_i^T K p_i.
    """
    R = Q.T @ Y
    K = Q.T @ Z
    K = (K + K.T) / 2
    W = Q.T @ Omega
    T = Z.T @ Omega
    S = torch.linalg.solve(R.T, torch.eye(R.shape[0], dtype=R.dtype, device=R.device))
    S = S / S.norm(dim=0)
    low = K.trace() - (S * (K @ S)).sum(0)
    P = W - S * (S * W).sum(0)
    quad = (Omega * Y).sum(0) - 2 * (T * P).sum(0) + (P * (K @ P)).sum(0)
    return (low + quad).cpu()


def _xtrace(products: _Products, gen, Omega: torch.Tensor, Y: torch.Tensor, rtol: float) -> TraceResult:
    """Adaptive XTrace: double the number of test vectors until ``rtol`` or the budget is reached."""
    n = products.H.shape[0]
    eps = operator_eps(products.H)
    Q = Omega.new_zeros(n, 0)
    Z = Omega.new_zeros(n, 0)
    Y_new = Y
    while True:
        Q, Z, captured = _extend_basis(products, Q, Z, Y_new, eps)
        if captured:
            exact = float((Q * Z).sum())
            return _result(exact, 0.0, 1, products.used, "xtrace", 1.0)
        samples = _xtrace_samples(Omega, Y, Q, Z)
        add = min(Omega.shape[1], products.left // 2)
        if _reached(samples, rtol) or add < 1:
            mean, se = _mean_and_error(samples)
            return _result(mean, se, samples.numel() - 1, products.used, "xtrace", rtol)
        Omega_new = rademacher(n, add, gen, Omega.device)
        Y_new = products(Omega_new)
        Omega, Y = torch.cat([Omega, Omega_new], 1), torch.cat([Y, Y_new], 1)


def _hutchplusplus(products: _Products, gen, rtol: float) -> TraceResult:
    """Hutch++: exact trace on a sketch of a third of the budget, Hutchinson on the deflated rest."""
    n = products.H.shape[0]
    device = products.H.device
    s = max(1, min(products.budget // 3, 50))
    HS = products(rademacher(n, s, gen, device))
    Q, _ = torch.linalg.qr(HS)
    low = float((Q * products(Q)).sum())
    samples = torch.zeros(0, dtype=torch.float64)
    while products.left > 0 and not _reached(samples + low, rtol):
        G = rademacher(n, products.next_block(), gen, device)
        G -= Q @ (Q.T @ G)
        samples = torch.cat([samples, (G * products(G)).sum(0).cpu()])
    mean, se = _mean_and_error(samples)
    return _result(low + mean, se, samples.numel() - 1, products.used, "hutch++", rtol)


def trace(H: Any, rtol: float = 0.02, max_matvecs: int | None = None, method: str = "auto",
          seed: Seed = None, progress: bool | None = None) -> TraceResult:
    r"""Estimate tr(H) until the relative standard error reaches ``rtol`` or ``max_matvecs`` products.

    Returns the estimate, its standard error and a 95% Student-t interval. ``method="auto"`` runs
    a 10-probe Hutchinson pilot, measures how much of ||H||_F^2 a small sketch captures, and
    continues with XTrace (spectrum dominated by a few eigenvalues) or Hutchinson (spread out),
    reusing every pilot product. When the budget would exceed ``n`` anyway, the trace is computed
    exactly from n unit-vector products (standard error 0).

    >>> res = trace(H, rtol=0.02, seed=0)
    >>> res.estimate, res.stderr, res.ci95
    """
    n = check_operator(H)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    budget = DEFAULT_TRACE_BUDGET if max_matvecs is None else int(max_matvecs)
    if budget < 2:
        raise ValueError(f"max_matvecs={max_matvecs} is too small: a standard error needs at least 2 products")
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    with progress_bar(total=min(budget, n) if n <= PILOT else budget, desc="trace", enable=progress) as bar:
        products = _Products(H, budget, bar)
        if n <= min(PILOT, budget):
            return _result(float(_exact_diagonal(products, n).sum()), 0.0, 1, products.used, "exact", rtol)
        if method == "hutch++":
            result = _hutchplusplus(products, gen, rtol)
        else:
            Z = rademacher(n, min(PILOT, budget), gen, H.device)
            HZ = products(Z)
            samples = (Z * HZ).sum(0).cpu()
            low_rank = method == "xtrace" or (method == "auto" and not _reached(samples, rtol)
                                              and n >= 4 * PILOT and _residual_share(Z, HZ) < LOW_RANK_SHARE)
            if low_rank:
                result = _xtrace(products, gen, Z, HZ, rtol)
            elif _hutchinson_needs_more_than(samples, rtol, n) and n <= products.left:
                return _result(float(_exact_diagonal(products, n).sum()), 0.0, 1, products.used, "exact", rtol)
            else:
                samples = _hutchinson(products, gen, samples, rtol)
                mean, se = _mean_and_error(samples)
                result = _result(mean, se, samples.numel() - 1, products.used, "hutchinson", rtol)
    if not result.converged:
        warnings.warn(
            f"trace: relative standard error {result.stderr / max(abs(result.estimate), 1e-300):.3g} did not reach "
            f"rtol={rtol} within {result.matvecs} products; raise max_matvecs (the interval is still honest)",
            RuntimeWarning, stacklevel=2,
        )
    return result


def diagonal(H: Any, max_matvecs: int | None = None, seed: Seed = None,
             progress: bool | None = None) -> DiagResult:
    r"""Estimate diag(H) with per-entry standard errors.

    Hutchinson: mean over Rademacher probes of z * (H z); entry i has variance sum_{j != i} H_ij^2
    per probe, so many probes are needed for small relative errors. When ``n <= max_matvecs`` the
    diagonal is computed exactly from unit-vector products (standard error 0) instead.

    >>> d = diagonal(H, max_matvecs=200, seed=0)
    >>> d.estimate, d.stderr
    """
    n = check_operator(H)
    budget = DEFAULT_DIAG_BUDGET if max_matvecs is None else int(max_matvecs)
    if budget < 2:
        raise ValueError(f"max_matvecs={max_matvecs} is too small: a standard error needs at least 2 products")
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    with progress_bar(total=min(n, budget), desc="diagonal", enable=progress) as bar:
        products = _Products(H, budget, bar)
        if n <= budget:
            diag = _exact_diagonal(products, n)
            return DiagResult(diag, torch.zeros(n, dtype=torch.float64), products.used)
        total = torch.zeros(n, dtype=torch.float64, device=H.device)
        total_sq = torch.zeros_like(total)
        while products.left > 0:
            Z = rademacher(n, products.next_block(), gen, H.device)
            D = Z * products(Z)
            total += D.sum(1)
            total_sq += D.square().sum(1)
        m = products.used
        mean = total / m
        var = (total_sq - m * mean.square()).clamp_min(0) / (m - 1)
        return DiagResult(mean, (var / m).sqrt(), m)
