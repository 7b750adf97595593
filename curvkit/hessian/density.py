r"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe v, m Lanczos steps give T = S diag(theta) S^T; the quadrature nodes theta_j with
weights tau_j = S[0, j]^2 satisfy sum_j tau_j f(theta_j) ~ v^T f(H) v. For Rademacher v / sqrt(n),
E[v^T f(H) v] = tr f(H) / n, so averaging over probes estimates the spectral measure
(1/n) sum_i delta(x - lambda_i); smoothing with a Gaussian of width sigma gives a density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr

from .._utils.progress import progress_bar
from .._utils.random import Seed, make_generator, rademacher_matrix
from .lanczos import Lanczos
from .operator import check_operator
from .results import _short

DEFAULT_PROBES = 10
DEFAULT_STEPS = 80


@dataclass(repr=False)
class Spectrum:
    """A discrete spectral measure: ``nodes`` (eigenvalue locations) with ``weights`` summing to 1.

    ``n`` is the operator size, so ``n * sum(weights * nodes)`` estimates the trace.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n: int = 0
    n_probes: int = 1

    def __repr__(self) -> str:
        return (f"Spectrum(range=[{self.nodes.min().item():.4g}, {self.nodes.max().item():.4g}], "
                f"nodes={self.nodes.numel()}, probes={self.n_probes}, trace~{self.trace:.4g}, "
                f"weights={_short(self.weights, 3)})")

    @property
    def trace(self) -> float:
        """SLQ estimate of tr H = n * integral of x against the measure."""
        return self.n * float((self.weights * self.nodes).sum())

    def default_sigma(self) -> float:
        """Kernel width: 1% of the spectral range (so that the bulk is resolved, not a comb of spikes)."""
        spread = float(self.nodes.max() - self.nodes.min())
        return 0.01 * spread if spread > 0 else max(1e-3 * float(self.nodes.abs().max()), 1e-12)

    def grid(self, num: int = 1000, sigma: float | None = None) -> np.ndarray:
        """Evaluation points covering the spectrum plus 4 kernel widths on each side."""
        sigma = self.default_sigma() if sigma is None else sigma
        return np.linspace(float(self.nodes.min()) - 4 * sigma, float(self.nodes.max()) + 4 * sigma, num)

    def _kernel(self, grid: Any, sigma: float | None, fn) -> np.ndarray:
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        x = np.asarray(grid, dtype=np.float64)[..., None]
        z = (x - self.nodes.numpy()) / sigma
        return (fn(z, sigma) * self.weights.numpy()).sum(-1)

    def pdf(self, grid: Any, sigma: float | None = None) -> np.ndarray:
        r"""Smoothed density sum_j w_j N(x; theta_j, sigma^2) at the points ``grid``."""
        return self._kernel(grid, sigma, lambda z, s: np.exp(-0.5 * z**2) / (s * math.sqrt(2 * math.pi)))

    def cdf(self, grid: Any, sigma: float | None = None) -> np.ndarray:
        r"""Smoothed cumulative distribution sum_j w_j Phi((x - theta_j) / sigma)."""
        return self._kernel(grid, sigma, lambda z, s: ndtr(z))

    def plot(self, ax=None, sigma: float | None = None, log: bool = True, cumulative: bool = False,
             grid: Any = None):
        """Plot the smoothed density (log scale by default) or its CDF; returns the Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        sigma = self.default_sigma() if sigma is None else sigma
        x = self.grid(sigma=sigma) if grid is None else np.asarray(grid)
        if cumulative:
            ax.plot(x, self.cdf(x, sigma))
            ax.set_ylabel("fraction of eigenvalues below")
        else:
            y = self.pdf(x, sigma)
            ax.plot(x, y)
            ax.fill_between(x, y, alpha=0.2)
            ax.set_ylabel("density" + (" (log scale)" if log else ""))
            if log:
                ax.set_yscale("log")
                ax.set_ylim(bottom=max(y.max() * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue")
        ax.set_title(f"Hessian eigenvalue density (SLQ, {self.n_probes} probes, kernel width {sigma:.3g})")
        ax.grid(alpha=0.3)
        return ax.figure


def density(H: Any, n_probes: int | None = None, n_iter: int | None = None, seed: Seed = None,
            progress: bool | None = None, basis_dtype: torch.dtype = torch.float64) -> Spectrum:
    r"""Spectral density of H by stochastic Lanczos quadrature.

    Runs ``n_probes`` Lanczos recurrences (``n_iter`` steps each, full reorthogonalisation) in
    lock-step from Rademacher probes; costs ``n_probes * n_iter`` products.

    >>> H = torch.diag(torch.tensor([1.0, 1.0, 2.0, 5.0], dtype=torch.float64))
    >>> spec = density(H, n_probes=10, n_iter=4, seed=0)
    >>> sorted({round(v, 6) for v in spec.nodes.tolist()})       # 4 steps find the 3 distinct eigenvalues
    [1.0, 2.0, 5.0]
    >>> fig = spec.plot()                                         # fig.savefig("esd.png")

    Args:
        H: a symmetric operator (or dense tensor).
        n_probes: Rademacher probes (default 10).
        n_iter: Lanczos steps per probe (default min(80, n)).
        seed: an int, a ``torch.Generator`` or None for the probes.
        progress: show a progress bar (None: when stderr is a terminal).
        basis_dtype: the dtype the Lanczos vectors are stored in (see :class:`~curvkit.hessian.Lanczos`).

    Returns:
        A :class:`Spectrum` of ``n_probes * n_iter`` weighted nodes.

    Raises:
        ValueError: ``n_probes`` or ``n_iter`` below 1.
    """
    n = check_operator(H)
    n_probes = DEFAULT_PROBES if n_probes is None else int(n_probes)
    n_iter = min(DEFAULT_STEPS, n) if n_iter is None else int(n_iter)
    if n_probes < 1 or n_iter < 1:
        raise ValueError(f"n_probes and n_iter must be positive, got {n_probes} and {n_iter}")
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    lanczos = Lanczos(H, rademacher_matrix(n, n_probes, gen, H.device), n_iter, basis_dtype)
    with progress_bar(total=lanczos.max_steps, desc="slq", enable=progress) as bar:
        while not lanczos.done:
            lanczos.step()
            bar.update(1)
    nodes, weights = [], []
    for col in range(n_probes):
        theta, S, _ = lanczos.ritz(col)
        nodes.append(theta)
        weights.append(S[0, :] ** 2 / n_probes)
    return Spectrum(torch.as_tensor(np.concatenate(nodes)), torch.as_tensor(np.concatenate(weights)),
                    n=n, n_probes=n_probes)
