"""PreconditionedOperator against dense D^-1/2 A D^-1/2 and the spectrum of D^-1 A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import HessianOperator, PreconditionedOperator, eigenvalues
from tests._models import make_model, spectrum_matrix


def _dense_case(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = spectrum_matrix(torch.linspace(-2.0, 5.0, n), seed=seed)
    d = torch.rand(n, generator=g) * 10 + 0.01  # badly scaled, as an Adam preconditioner is
    return A, d


def test_products_match_dense_and_count():
    A, d = _dense_case()
    P = PreconditionedOperator(A, d)
    s = d.rsqrt()
    V = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(P @ V, (s[:, None] * A * s[None, :]) @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P @ V[:, 0], (P @ V)[:, 0])
    assert P.shape == (12, 12) and P.dtype == torch.float64 and P.device == A.device
    assert P.matvecs == 7 and P.params == [] and P.param_names == []


def test_eigenvalues_are_those_of_the_non_symmetric_d_inverse_a():
    A, d = _dense_case()
    P = PreconditionedOperator(A, d)
    dense = P @ torch.eye(12)
    torch.testing.assert_close(dense, dense.T, rtol=1e-12, atol=1e-12)
    want = np.sort(np.linalg.eigvals(np.diag(1 / d.numpy()) @ A.numpy()).real)
    np.testing.assert_allclose(np.linalg.eigvalsh(dense.numpy()), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eigenvalues(P, k=2, tol=1e-10, seed=0).values, want[::-1][:2], rtol=1e-8)


def test_over_a_hessian_operator_with_a_diagonal_per_parameter():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    diag = [torch.rand_like(p) + 0.1 for p in H.params]
    P = PreconditionedOperator(H, diag)
    assert P.param_names == H.param_names and P.params == H.params and P.shape == H.shape
    D = H @ torch.eye(H.shape[0])
    s = H.flatten(diag).rsqrt()
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2))
    before = H.matvecs
    torch.testing.assert_close(P @ v, s * (D @ (s * v)), rtol=1e-10, atol=1e-12)
    assert P.matvecs == 1 and H.matvecs == before + 1
    listed = P @ P.split(v)
    torch.testing.assert_close(P.flatten(listed), P @ v)
    torch.testing.assert_close(PreconditionedOperator(H, H.flatten(diag)) @ v, P @ v)


def test_float32_operator_keeps_its_dtype():
    A, d = _dense_case()
    P = PreconditionedOperator(A.float(), d.float())
    assert P.dtype == torch.float32
    v = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(P @ v, PreconditionedOperator(A, d) @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(12), ValueError, "positive"),
    (-torch.ones(12), ValueError, "positive"),
    (torch.full((12,), float("nan")), ValueError, "finite"),
    (torch.full((12,), float("inf")), ValueError, "finite"),
    (torch.ones(11), ValueError, r"shape \(12,\)"),
    (torch.ones(12, dtype=torch.long), TypeError, "floating-point"),
    ([torch.ones(12)], ValueError, r"\.params"),
    ("ones", TypeError, "floating-point"),
])
def test_bad_diagonals_are_refused(bad, error, match):
    A, _ = _dense_case()
    with pytest.raises(error, match=match):
        PreconditionedOperator(A, bad)


def test_list_diagonal_of_the_wrong_shapes_is_refused():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="shaped like H.params"):
        PreconditionedOperator(H, [torch.ones(3)])


def test_non_square_operator_is_refused():
    with pytest.raises(TypeError, match="square"):
        PreconditionedOperator(torch.ones(3, 4), torch.ones(3))
