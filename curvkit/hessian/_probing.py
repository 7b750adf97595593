"""What the randomised estimators share: a product budget that sizes probe blocks, running errors, exact diagonals."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._utils.random import rademacher_matrix
from .operator import matmat_float64

PILOT = 10          # probes before the first stopping decision (enough for a usable standard error)
BLOCK = 10          # first probe block; blocks double up to the operator's max_block (one data pass each)


def check_budget(max_matvecs: int | None, default: int) -> int:
    """The product budget: ``max_matvecs`` or ``default``; a standard error needs at least 2 products.

    Raises:
        ValueError: the budget is below 2.
    """
    budget = default if max_matvecs is None else int(max_matvecs)
    if budget < 2:
        raise ValueError(f"max_matvecs={max_matvecs} is too small: a standard error needs at least 2 products")
    return budget


class ProductBudget:
    """Counts products against a budget, advances the progress bar, and sizes probe blocks.

    Blocks start at ``BLOCK`` probes and double up to the operator's ``max_block``, so a dataset
    operator builds each batch's graph once per block while stopping checks stay frequent early.
    """

    def __init__(self, H: Any, budget: int, bar):
        self.H, self.budget, self.used, self.bar = H, budget, 0, bar
        self._block = BLOCK

    @property
    def left(self) -> int:
        """Products still allowed."""
        return self.budget - self.used

    def next_block(self, wanted: int | None = None) -> int:
        """Size of the next probe block (within the budget).

        Args:
            wanted: the probes a stopping rule predicts it still needs; the block is then that many, up to
                the operator's ``max_block`` (one data pass). None: the doubling schedule above.
        """
        if wanted is not None:
            return max(1, min(wanted, getattr(self.H, "max_block", BLOCK), self.left))
        size = min(self._block, self.left)
        if not getattr(self.H, "single_batch", True):
            self._block = min(2 * self._block, getattr(self.H, "max_block", self._block))
        return size

    def _count(self, k: int) -> None:
        self.used += k
        self.bar.update(k)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` in float64, counted."""
        self._count(V.shape[1])
        return matmat_float64(self.H, V)

    def samples(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """:func:`hutchinson_samples` of ``H``, counted as k products."""
        self._count(k)
        return hutchinson_samples(self.H, k, gen)


def hutchinson_samples(H: Any, k: int, gen: torch.Generator) -> torch.Tensor:
    r"""``(n, k)`` float64 Hutchinson samples :math:`z \odot H z`, each with expectation diag(H).

    On an operator over several batches or ranks (``H.stratified``) each batch gets its own probe
    (:meth:`~curvkit.hessian.model.ModelOperator.stratified_samples`); otherwise one Rademacher probe
    serves a column.
    """
    if getattr(H, "stratified", False):
        return H.stratified_samples(k, gen)
    Z = rademacher_matrix(H.shape[0], k, gen, H.device)
    return Z * matmat_float64(H, Z)


def mean_and_error(samples: torch.Tensor) -> tuple[float, float]:
    """The mean of 1-D ``samples`` and its standard error (inf for fewer than 2 samples)."""
    m = samples.numel()
    mean = float(samples.mean())
    return mean, (float(samples.std()) / math.sqrt(m) if m > 1 else math.inf)


def reached(samples: torch.Tensor, rtol: float) -> bool:
    """Whether the mean of ``samples`` has a relative standard error of at most ``rtol``."""
    mean, se = mean_and_error(samples)
    return samples.numel() >= 2 and se <= rtol * abs(mean)


def exact_diagonal(products: ProductBudget, n: int) -> torch.Tensor:
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
