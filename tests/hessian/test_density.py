"""Spectral density by SLQ against exact spectra."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from curvkit.hessian import HessianOperator, density
from tests._models import spectrum_matrix


def test_quadrature_matches_exact_spectrum_in_wasserstein_distance():
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat([torch.tensor([30.0, 18.0]), torch.randn(398, generator=g).abs() * 2 - 0.5])
    A = spectrum_matrix(eigs, seed=1)
    spec = density(A, n_probes=10, n_iter=60, seed=0)
    w1 = wasserstein_distance(spec.nodes.numpy(), eigs.numpy(), u_weights=spec.weights.numpy())
    width = float(eigs.max() - eigs.min())
    assert w1 / width < 0.01, w1 / width
    torch.testing.assert_close(spec.weights.sum(), torch.tensor(1.0))
    assert abs(spec.trace - float(eigs.sum())) < 0.1 * float(eigs.abs().sum())
    # extreme Ritz values converge to the extreme eigenvalues
    assert abs(float(spec.nodes.max()) - 30.0) < 1e-6


def test_density_integrates_to_one_and_cdf_is_monotone():
    A = spectrum_matrix(torch.linspace(-1, 4, 150), seed=0)
    spec = density(A, n_probes=4, n_iter=30, seed=1)
    grid = spec.grid(num=4000)
    assert abs(np.trapezoid(spec.pdf(grid), grid) - 1) < 1e-3
    cdf = spec.cdf(grid)
    assert np.all(np.diff(cdf) >= -1e-12) and cdf[0] < 1e-3 and cdf[-1] > 1 - 1e-3


def test_network_density_and_plot(tmp_path, model_and_hessian):
    model, data, D = model_and_hessian
    H = HessianOperator(model, F.cross_entropy, data)
    spec = density(H, n_probes=4, n_iter=min(40, H.shape[0]), seed=0)
    exact = torch.linalg.eigvalsh(D)
    w1 = wasserstein_distance(spec.nodes.numpy(), exact.numpy(), u_weights=spec.weights.numpy())
    assert w1 / float(exact.max() - exact.min()) < 0.03
    fig = spec.plot()
    spec.plot(ax=fig.axes[0], cumulative=True, log=False)
    fig.savefig(tmp_path / "esd.png")
    assert (tmp_path / "esd.png").stat().st_size > 1000
    assert "Spectrum(" in repr(spec)
