"""Trace and diagonal estimators: exactness where possible, honest intervals elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import HessianOperator, diagonal, trace
from curvkit.hessian.trace import _xtrace_samples
from tests._models import make_model, spectrum_matrix


def _random_symmetric(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g)
    return (A + A.T) / 2 + torch.diag(torch.rand(n, generator=g) * 3)


def test_xtrace_samples_match_their_definition():
    """Each exchangeable sample equals tr(Q_i^T A Q_i) + w_i^T (I-P_i) A (I-P_i) w_i with Q_i from AW_{-i}."""
    n, s = 30, 6
    A = _random_symmetric(n, 0)
    W = torch.randn(n, s, generator=torch.Generator().manual_seed(1))
    Y = A @ W
    Q, _ = torch.linalg.qr(Y)
    fast = _xtrace_samples(W, Y, Q, A @ Q)
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1:]], 1))
        P = torch.eye(n) - Qi @ Qi.T
        slow = (Qi.T @ A @ Qi).trace() + W[:, i] @ P @ A @ P @ W[:, i]
        torch.testing.assert_close(fast[i], slow, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "xtrace", "hutch++", "auto"])
def test_interval_coverage_over_many_seeds(method):
    """The 95% interval covers the true trace in about 95% of runs (binomial: >= 85% of 100)."""
    eigs = torch.cat([torch.tensor([40.0, 25.0, 12.0]), torch.randn(197, generator=torch.Generator().manual_seed(5))])
    A = spectrum_matrix(eigs, seed=2)
    truth = float(eigs.sum())
    hits = []
    for seed in range(100):
        res = trace(A, rtol=0.05, max_matvecs=150, method=method, seed=seed)
        hits.append(res.ci95[0] <= truth <= res.ci95[1])
        assert res.matvecs <= 150
    assert np.mean(hits) >= 0.85, np.mean(hits)


def test_auto_prefers_xtrace_for_dominant_eigenvalues_and_hutchinson_for_flat_spectra():
    g = torch.Generator().manual_seed(0)
    low_rank = spectrum_matrix(torch.cat([torch.tensor([100.0, 50.0, 30.0]), 0.01 * torch.rand(297, generator=g)]))
    flat = spectrum_matrix(torch.rand(300, generator=g) + 0.5)
    assert trace(low_rank, seed=0).method == "xtrace"
    res = trace(flat, seed=0)
    assert res.method == "hutchinson" and res.converged
    assert abs(res.estimate - float(torch.linalg.eigvalsh(flat).sum())) <= 4 * res.stderr


def test_xtrace_is_exact_when_the_sketch_captures_the_range():
    U, _ = torch.linalg.qr(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)))
    A = U @ torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0])) @ U.T
    res = trace(A, method="xtrace", seed=0)
    assert res.stderr == 0 and abs(res.estimate - 5.0) < 1e-10


def test_trace_of_networks_and_exact_small_operators(model_and_hessian):
    model, data, D = model_and_hessian
    H = HessianOperator(model, F.cross_entropy, data)
    res = trace(H, rtol=0.05, max_matvecs=60, method="hutchinson", seed=0)
    assert res.matvecs <= 60
    truth = float(D.trace())
    assert res.ci95[0] - 3 * res.stderr <= truth <= res.ci95[1] + 3 * res.stderr
    small = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    exact = trace(small, seed=0)
    assert exact.method == "exact" and exact.estimate == 6.0 and exact.stderr == 0


def test_trace_stops_at_rtol_and_reports_budget_exhaustion():
    A = spectrum_matrix(torch.rand(300, generator=torch.Generator().manual_seed(1)) + 1.0)
    res = trace(A, rtol=0.01, method="hutchinson", seed=0)
    assert res.converged and res.stderr <= 0.01 * abs(res.estimate)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        short = trace(A, rtol=1e-6, max_matvecs=30, method="hutchinson", seed=0)
    assert not short.converged and short.matvecs == 30


def test_diagonal_exact_and_estimated():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    from tests._models import dense_hessian

    D = dense_hessian(model, F.cross_entropy, [(x, y)])
    exact = diagonal(H, max_matvecs=H.shape[0], seed=0)
    torch.testing.assert_close(exact.estimate, D.diagonal(), rtol=1e-10, atol=1e-12)
    assert exact.stderr.abs().max() == 0
    A = spectrum_matrix(torch.rand(120, generator=torch.Generator().manual_seed(2)), seed=4)
    est = diagonal(A, max_matvecs=100, seed=0)
    z = (est.estimate - A.diagonal()) / est.stderr
    assert est.matvecs == 100 and (z.abs() < 4).float().mean() > 0.95


def test_same_seed_same_trace():
    A = spectrum_matrix(torch.rand(100) + 1, seed=0)
    assert trace(A, seed=3).estimate == trace(A, seed=3).estimate


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="lanczos"), "method must be"),
    (dict(rtol=0), "rtol must be positive"),
    (dict(max_matvecs=1), "too small"),
])
def test_trace_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trace(torch.eye(50), **kwargs)
    with pytest.raises(TypeError, match="seed"):
        trace(torch.eye(50), seed="zero")
