r"""Stochastic estimation of diag(H) with per-entry standard errors."""

from __future__ import annotations

from typing import Any

import torch

from .._utils.progress import progress_bar
from .._utils.random import Seed, make_generator
from .._utils.stats import RunningMoments
from ._probing import ProductBudget, check_budget, exact_diagonal
from .operator import check_operator
from .results import DiagResult

DEFAULT_DIAG_BUDGET = 100


def diagonal(H: Any, max_matvecs: int | None = None, seed: Seed = None,
             progress: bool | None = None) -> DiagResult:
    r"""Estimate diag(H) with per-entry standard errors.

    Hutchinson: the mean over Rademacher probes z of :math:`z \odot (H z)`; entry i has variance
    :math:`\sum_{j \ne i} H_{ij}^2` per probe, so many probes are needed for small relative errors.
    When ``n <= max_matvecs`` the diagonal is computed exactly from unit-vector products (standard
    error 0) instead. On an operator over several batches (or ranks) the probes are stratified, each
    batch its own (:meth:`~curvkit.hessian.model.ModelOperator.stratified_samples`), which lowers the
    variance by up to the number of batches.

    >>> H = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> diagonal(H, max_matvecs=10).estimate.tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]

    Args:
        H: a square operator (or dense tensor).
        max_matvecs: the product budget (default 100).
        seed: an int, a ``torch.Generator`` or None (fresh entropy) for the probes.
        progress: show a progress bar (None: when stderr is a terminal).

    Returns:
        A :class:`~curvkit.hessian.results.DiagResult` (estimate, stderr, matvecs).

    Raises:
        ValueError: ``max_matvecs`` below 2, or an empty operator.
        TypeError: ``H`` is not a square operator.
    """
    n = check_operator(H)
    budget = check_budget(max_matvecs, DEFAULT_DIAG_BUDGET)
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    with progress_bar(total=min(n, budget), desc="diagonal", enable=progress) as bar:
        products = ProductBudget(H, budget, bar)
        if n <= budget:
            diag = exact_diagonal(products, n)
            return DiagResult(diag, torch.zeros(n, dtype=torch.float64), products.used)
        moments = RunningMoments(n, device=H.device)
        while products.left > 0:
            moments.add(products.samples(products.next_block(), gen))
        return DiagResult(moments.mean, moments.stderr, moments.count)
