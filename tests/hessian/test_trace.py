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


def _three_unequal_batches():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, [(x[:7], y[:7]), (x[7:22], y[7:22]), (x[22:], y[22:])]


def _offdiagonal_variance(A: torch.Tensor) -> float:
    """Var z^T A z for Rademacher z: 2 (||A||_F^2 - sum_i A_ii^2)."""
    return float(2 * (A.square().sum() - A.diagonal().square().sum()))


def test_stratified_samples_are_unbiased_with_the_stratified_variance():
    """Each batch's own probe: mean tr H, variance sum_b w_b^2 Var z^T H_b z (below the shared-probe one here)."""
    from curvkit._utils.random import make_generator
    from tests._models import dense_hessian

    model, batches = _three_unequal_batches()
    weights = [len(b[1]) / 40 for b in batches]
    hessians = [dense_hessian(model, F.cross_entropy, [b]) for b in batches]
    H = sum(w * h for w, h in zip(weights, hessians))
    predicted = sum(w * w * _offdiagonal_variance(h) for w, h in zip(weights, hessians))
    operator = HessianOperator(model, F.cross_entropy, batches)
    assert operator.stratified
    samples = operator.stratified_samples(4000, make_generator(0)).sum(0)
    se = float(samples.std()) / 4000 ** 0.5
    assert abs(float(samples.mean()) - float(H.trace())) < 4 * se
    assert float(samples.var()) == pytest.approx(predicted, rel=0.15)
    assert predicted < 0.8 * _offdiagonal_variance(H)


def test_stratified_samples_weight_unequal_batches_exactly():
    """Diagonal batch Hessians make every sample exact: sum_b (n_b / N) diag H_b = diag H, whatever the probes."""
    model = torch.nn.Linear(6, 1, bias=False).double()
    g = torch.Generator().manual_seed(1)
    coefficients = torch.rand(30, 6, generator=g, dtype=torch.float64)
    batches = [{"c": coefficients[:4]}, {"c": coefficients[4:13]}, {"c": coefficients[13:]}]

    def forward(m, batch):  # per-sample loss sum_j c_j w_j^2: Hessian diag(2 mean_i c_ij)
        return (batch["c"] * m.weight.square()).sum(1).mean()

    operator = HessianOperator(model, None, batches, forward=forward)
    samples = operator.stratified_samples(5, torch.Generator().manual_seed(0))
    exact = 2 * coefficients.mean(0)
    torch.testing.assert_close(samples, exact[:, None].expand(6, 5))
    result = diagonal(operator, max_matvecs=5, seed=0)  # n = 6 > 5 products: estimated, exact all the same
    torch.testing.assert_close(result.estimate, exact)


def test_dataset_trace_is_honest_with_stratified_probes():
    """Stratified Hutchinson on 3 batches: intervals cover tr H in >= 85% of 40 seeds, errors near rtol."""
    from tests._models import dense_hessian

    model, batches = _three_unequal_batches()
    truth = float(dense_hessian(model, F.cross_entropy, batches).trace())
    operator = HessianOperator(model, F.cross_entropy, batches)
    runs = [trace(operator, rtol=0.15, max_matvecs=500, method="hutchinson", seed=seed) for seed in range(40)]
    assert all(r.converged for r in runs) and sum(r.method == "hutchinson" for r in runs) >= 30
    assert np.mean([r.ci95[0] <= truth <= r.ci95[1] for r in runs]) >= 0.85
    assert np.sqrt(np.mean([(r.estimate / truth - 1) ** 2 for r in runs])) < 0.2

