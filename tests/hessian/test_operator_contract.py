"""The contract every curvature operator keeps: it equals its dense matrix, is symmetric, takes every vector
form, counts its products, refuses bad vectors, and leaves the model untouched. Add new operators to CASES."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import (
    AffineOperator,
    DiagonalSandwich,
    GGNOperator,
    HessianOperator,
    PreconditionedOperator,
)
from tests._models import assert_untouched_by, dense_ggn, hessian_case, make_model


def _diag(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64)


def _hessian(model, x, y, **kw):
    return HessianOperator(model, F.cross_entropy, (x, y), **kw), None


def _ggn(model, x, y, **kw):
    return GGNOperator(model, F.cross_entropy, (x, y), **kw), None


def _preconditioned(model, x, y, **kw):
    H = HessianOperator(model, F.cross_entropy, (x, y), **kw)
    s = _diag(H.shape[0]).rsqrt()
    return PreconditionedOperator(H, _diag(H.shape[0])), lambda D: s[:, None] * D * s[None, :]


def _shifted(model, x, y, **kw):
    H = HessianOperator(model, F.cross_entropy, (x, y), **kw)
    return H.shift(0.3), lambda D: D + 0.3 * torch.eye(D.shape[0], dtype=D.dtype)


def _scaled(model, x, y, **kw):
    return -2.5 * HessianOperator(model, F.cross_entropy, (x, y), **kw), lambda D: -2.5 * D


def _sandwich(model, x, y, **kw):
    H = HessianOperator(model, F.cross_entropy, (x, y), **kw)
    d = _diag(H.shape[0])
    return DiagonalSandwich(H, d), lambda D: d[:, None] * D * d[None, :]


CASES = {"hessian": _hessian, "ggn": _ggn, "preconditioned": _preconditioned, "shifted": _shifted,
         "scaled": _scaled, "sandwich": _sandwich}


def _dense(name: str, kind: str):
    model, (x, y), D = hessian_case(kind)
    if name == "ggn":
        D = dense_ggn(model, F.cross_entropy, [(x, y)])
    op, transform = CASES[name](model, x, y)
    return op, (D if transform is None else transform(D))


@pytest.mark.parametrize("kind", ["tanh_mlp", "conv_bn"])
@pytest.mark.parametrize("name", CASES)
def test_equals_its_dense_matrix_and_is_symmetric(name, kind):
    A, D = _dense(name, kind)
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(0))
    AV = A @ V
    torch.testing.assert_close(AV, D @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(V.T @ AV, (V.T @ AV).T, rtol=1e-10, atol=1e-12)
    assert A.shape == D.shape and A.matvecs == 3


@pytest.mark.parametrize("name", CASES)
def test_vector_forms_agree(name):
    A, D = _dense(name, "tanh_mlp")
    v = torch.randn(D.shape[0], generator=torch.Generator().manual_seed(1))
    flat = A @ v
    listed = A @ A.split(v)
    assert [t.shape for t in listed] == [p.shape for p in A.params]
    torch.testing.assert_close(A.flatten(listed), flat)
    torch.testing.assert_close((A @ v[:, None])[:, 0], flat)
    torch.testing.assert_close(torch.as_tensor(A.to_scipy() @ v.numpy()), flat)
    torch.testing.assert_close((A @ v.float()).double(), flat, rtol=1e-5, atol=1e-6)
    assert (A @ v.new_zeros(D.shape[0], 0)).shape == (D.shape[0], 0)


@pytest.mark.parametrize("name", CASES)
def test_bad_vectors_are_refused(name):
    A, D = _dense(name, "tanh_mlp")
    n = D.shape[0]
    with pytest.raises(ValueError, match="shape"):
        A @ torch.ones(n + 1)
    with pytest.raises(ValueError, match="shape"):
        A @ torch.ones(n, 2, 2)
    with pytest.raises(TypeError, match="floating"):
        A @ torch.ones(n, dtype=torch.long)
    with pytest.raises(TypeError, match="tensor"):
        A @ ([1.0] * n)
    with pytest.raises(TypeError, match="tensor"):
        A @ "v"
    with pytest.raises(ValueError, match="shaped like"):
        A @ [torch.ones(3)]


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
@pytest.mark.parametrize("name", CASES)
def test_model_is_never_mutated(name, bn_mode):
    def products(model, x, y):
        A, _ = CASES[name](model, x, y, bn_mode=bn_mode)
        A @ torch.randn(A.shape[0], 2)

    assert_untouched_by(products)


def test_compositions_over_dense_matrices_and_their_bad_input():
    D = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    v = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert (AffineOperator(D, shift=1.0) @ v).tolist() == [2.0, -1.0, 4.0]
    assert ((2 * AffineOperator(D, shift=1.0)) @ v).tolist() == [4.0, -2.0, 8.0]
    assert ((-AffineOperator(D)) @ v).tolist() == [-1.0, 2.0, -3.0]
    assert (AffineOperator(D, scale=0.5, shift=-1.0) @ v).tolist() == [-0.5, -2.0, 0.5]
    assert (DiagonalSandwich(D, torch.tensor([1.0, 2.0, 0.5])) @ v).tolist() == [1.0, -8.0, 0.75]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        DiagonalSandwich(D, torch.ones(4))
    with pytest.raises(TypeError, match="square"):
        AffineOperator(torch.ones(2, 3), shift=1.0)
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    assert H.shift(1.0).param_names == H.param_names and H.shift(1.0).offsets == H.offsets
    assert not H.shift(1.0).distributed and H.shift(1.0).single_batch
