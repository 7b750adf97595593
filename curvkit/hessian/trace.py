r"""Stochastic trace estimation with honest error bars.

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
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from scipy.stats import t as student_t

from .._utils.progress import progress_bar
from .._utils.random import Seed, make_generator, rademacher_matrix
from ._probing import PILOT, ProductBudget, check_budget, exact_diagonal, mean_and_error, reached
from .operator import check_operator, operator_eps
from .results import TraceResult

DEFAULT_TRACE_BUDGET = 1000
LOW_RANK_SHARE = 0.25   # auto: XTrace when a rank-5 sketch leaves less than this share of ||H||_F^2


def _trace_result(estimate: float, stderr: float, dof: int, matvecs: int, method: str, rtol: float) -> TraceResult:
    half = 0.0 if stderr == 0 else float(student_t.ppf(0.975, max(dof, 1))) * stderr
    converged = stderr <= rtol * abs(estimate)
    return TraceResult(estimate, stderr, (estimate - half, estimate + half), matvecs, method, converged)


def _exact_trace(products: ProductBudget, rtol: float) -> TraceResult:
    n = products.H.shape[0]
    return _trace_result(float(exact_diagonal(products, n).sum()), 0.0, 1, products.used, "exact", rtol)


def _still_needed(samples: torch.Tensor, rtol: float, most: int) -> int:
    """How many more samples the mean needs for ``rtol`` at the sample variance so far (1 to ``most``)."""
    mean = float(samples.mean())
    if mean == 0:
        return most
    return max(1, min(most, math.ceil(float(samples.var()) / (rtol * mean) ** 2) - samples.numel()))


def _hutchinson(products: ProductBudget, gen, samples: torch.Tensor, rtol: float) -> torch.Tensor:
    """Add samples z^T H z, a block at a time, until ``rtol`` or the budget is reached.

    A block is as large as the variance so far says is still needed (+10%), up to one data pass; the
    samples are stratified on an operator over several batches or ranks (``_probing.hutchinson_samples``).
    """
    while products.left > 0 and not reached(samples, rtol):
        k = products.next_block(max(2, math.ceil(1.1 * _still_needed(samples, rtol, products.left))))
        samples = torch.cat([samples, products.samples(k, gen).sum(0).cpu()])
    return samples


def _hutchinson_needs_more_than(samples: torch.Tensor, rtol: float, n: int) -> bool:
    """Whether Hutchinson, at the pilot's variance, would need at least ``n`` probes to reach ``rtol``."""
    if reached(samples, rtol):
        return False
    mean, se = mean_and_error(samples)
    std = se * math.sqrt(samples.numel())
    return mean == 0 or (std / (rtol * abs(mean))) ** 2 >= n


def _residual_share(Z: torch.Tensor, HZ: torch.Tensor) -> float:
    """Share of ||H||_F^2 that a sketch from half the pilot leaves, measured on the other half."""
    half = Z.shape[1] // 2
    Q, _ = torch.linalg.qr(HZ[:, :half])
    test = HZ[:, half:]
    rest = test - Q @ (Q.T @ test)
    return float(rest.square().sum() / test.square().sum().clamp_min(1e-300))


def _extend_basis(products: ProductBudget, Q: torch.Tensor, Z: torch.Tensor, Y_new: torch.Tensor,
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


def _xtrace(products: ProductBudget, gen, Omega: torch.Tensor, Y: torch.Tensor, rtol: float) -> TraceResult:
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
            return _trace_result(exact, 0.0, 1, products.used, "xtrace", 1.0)
        samples = _xtrace_samples(Omega, Y, Q, Z)
        add = min(Omega.shape[1], products.left // 2)
        if reached(samples, rtol) or add < 1:
            mean, se = mean_and_error(samples)
            return _trace_result(mean, se, samples.numel() - 1, products.used, "xtrace", rtol)
        Omega_new = rademacher_matrix(n, add, gen, Omega.device)
        Y_new = products(Omega_new)
        Omega, Y = torch.cat([Omega, Omega_new], 1), torch.cat([Y, Y_new], 1)


def _hutchplusplus(products: ProductBudget, gen, rtol: float) -> TraceResult:
    """Hutch++: exact trace on a sketch of a third of the budget, Hutchinson on the deflated rest."""
    n = products.H.shape[0]
    device = products.H.device
    s = max(1, min(products.budget // 3, 50))
    HS = products(rademacher_matrix(n, s, gen, device))
    Q, _ = torch.linalg.qr(HS)
    low = float((Q * products(Q)).sum())
    samples = torch.zeros(0, dtype=torch.float64)
    while products.left > 0 and not reached(samples + low, rtol):
        G = rademacher_matrix(n, products.next_block(), gen, device)
        G -= Q @ (Q.T @ G)
        samples = torch.cat([samples, (G * products(G)).sum(0).cpu()])
    mean, se = mean_and_error(samples)
    return _trace_result(low + mean, se, samples.numel() - 1, products.used, "hutch++", rtol)


class _Pilot(NamedTuple):
    """The first probes Z, their products HZ, and the Hutchinson samples z^T H z."""

    Z: torch.Tensor
    HZ: torch.Tensor
    samples: torch.Tensor


def _pilot(products: ProductBudget, gen: torch.Generator) -> _Pilot:
    Z = rademacher_matrix(products.H.shape[0], min(PILOT, products.budget), gen, products.H.device)
    HZ = products(Z)
    return _Pilot(Z, HZ, (Z * HZ).sum(0).cpu())


def _by_hutchinson(products: ProductBudget, gen, rtol: float, pilot: _Pilot | None) -> TraceResult:
    """Hutchinson from the pilot on, or the exact trace when Hutchinson would need n products or more.

    Without a pilot (a stratified operator) the first ``PILOT`` samples take the pilot's place.
    """
    n = products.H.shape[0]
    first = products.samples(min(PILOT, products.budget), gen).sum(0).cpu() if pilot is None else pilot.samples
    if _hutchinson_needs_more_than(first, rtol, n) and n <= products.left:
        return _exact_trace(products, rtol)
    samples = _hutchinson(products, gen, first, rtol)
    mean, se = mean_and_error(samples)
    return _trace_result(mean, se, samples.numel() - 1, products.used, "hutchinson", rtol)


def _by_xtrace(products: ProductBudget, gen, rtol: float, pilot: _Pilot) -> TraceResult:
    return _xtrace(products, gen, pilot.Z, pilot.HZ, rtol)


def _by_hutchplusplus(products: ProductBudget, gen, rtol: float, pilot: None) -> TraceResult:
    return _hutchplusplus(products, gen, rtol)


def _auto(products: ProductBudget, gen, rtol: float, pilot: _Pilot) -> TraceResult:
    """XTrace when a sketch from half the pilot captures most of ||H||_F^2, Hutchinson otherwise."""
    low_rank = (not reached(pilot.samples, rtol) and products.H.shape[0] >= 4 * PILOT
                and _residual_share(pilot.Z, pilot.HZ) < LOW_RANK_SHARE)
    return (_by_xtrace if low_rank else _by_hutchinson)(products, gen, rtol, pilot)


METHODS: dict[str, Callable[..., TraceResult]] = {
    "auto": _auto, "hutchinson": _by_hutchinson, "hutch++": _by_hutchplusplus, "xtrace": _by_xtrace,
}


def trace(H: Any, rtol: float = 0.02, max_matvecs: int | None = None, method: str = "auto",
          seed: Seed = None, progress: bool | None = None) -> TraceResult:
    r"""Estimate tr(H) until the relative standard error reaches ``rtol`` or ``max_matvecs`` products.

    Returns the estimate, its standard error and a 95% Student-t interval. ``method="auto"`` runs
    a 10-probe Hutchinson pilot, measures how much of :math:`\|H\|_F^2` a small sketch captures, and
    continues with XTrace (spectrum dominated by a few eigenvalues) or Hutchinson (spread out),
    reusing every pilot product. When the budget would exceed ``n`` anyway, the trace is computed
    exactly from n unit-vector products (standard error 0). Every method but ``"hutch++"`` starts
    from the same pilot. On an operator over several batches (or ranks), ``"auto"`` and ``"hutchinson"``
    run stratified Hutchinson from the first probe
    (:meth:`~curvkit.hessian.model.ModelOperator.stratified_samples`: each batch its own probe, for up to
    1/B of the variance with B batches; measured 1/3 with 4 batches of a conv net, where a shared-probe pilot
    for XTrace's choice cost more than the whole stratified estimate); ask for ``method="xtrace"`` there
    when a few eigenvalues hold most of :math:`\|H\|_F^2`. Hutchinson's blocks are sized to the probes
    the variance so far says are still needed.

    >>> H = torch.diag(torch.linspace(1.0, 2.0, 50, dtype=torch.float64))
    >>> res = trace(H, rtol=0.02, seed=0)
    >>> round(res.estimate, 6), res.stderr, res.method
    (75.0, 0.0, 'hutchinson')

    Args:
        H: a square operator (or dense tensor).
        rtol: the relative standard error to reach.
        max_matvecs: the product budget (default 1000).
        method: ``"auto"``, ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        seed: an int, a ``torch.Generator`` or None (fresh entropy) for the probes.
        progress: show a progress bar (None: when stderr is a terminal).

    Returns:
        A :class:`~curvkit.hessian.results.TraceResult`; ``converged`` is False (with a warning) when
        ``rtol`` was not reached within the budget (the interval is still honest).

    Raises:
        ValueError: an unknown method, a non-positive ``rtol``, ``max_matvecs`` below 2, an empty operator.
        TypeError: ``H`` is not a square operator.
    """
    n = check_operator(H)
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    budget = check_budget(max_matvecs, DEFAULT_TRACE_BUDGET)
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    with progress_bar(total=min(budget, n) if n <= PILOT else budget, desc="trace", enable=progress) as bar:
        products = ProductBudget(H, budget, bar)
        if n <= min(PILOT, budget):
            return _exact_trace(products, rtol)
        stratified = getattr(H, "stratified", False)
        if method == "auto" and stratified:
            method = "hutchinson"  # stratified from the first probe; XTrace would need shared probes
        pilot = None if method == "hutch++" or (method == "hutchinson" and stratified) else _pilot(products, gen)
        result = METHODS[method](products, gen, rtol, pilot)
    if not result.converged:
        warnings.warn(
            f"trace: relative standard error {result.stderr / max(abs(result.estimate), 1e-300):.3g} did not reach "
            f"rtol={rtol} within {result.matvecs} products; raise max_matvecs (the interval is still honest)",
            RuntimeWarning, stacklevel=2,
        )
    return result
