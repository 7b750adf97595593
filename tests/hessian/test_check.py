"""check: products against finite differences of first derivatives; silently wrong products are flagged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from curvkit.hessian import CheckResult, GGNOperator, HessianOperator, check
from tests._models import MODEL_KINDS, TokenBag, dense_ggn, dense_hessian, make_model


class ConstantSlopeTanh(torch.autograd.Function):
    """tanh whose backward treats the saved output as a constant: right gradient, wrong second derivative."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y.detach() ** 2)


class OnceSoftplus(torch.autograd.Function):
    """softplus with a @once_differentiable backward: its incoming gradient is a constant when it is the last op."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class DetachedGradTanh(torch.autograd.Function):
    """tanh whose backward detaches its incoming gradient: right gradient, J v wrong through it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad.detach() * (1 - y**2)


class Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Residual(nn.Module):
    """Linear, an activation whose input also skips past it, Linear."""

    def __init__(self, fn):
        super().__init__()
        self.first, self.act, self.second = nn.Linear(4, 5), Activation(fn), nn.Linear(5, 3)

    def forward(self, x):
        h = self.first(x)
        return self.second(self.act(h) + h)


def _with_activation(model, fn):
    """A copy of ``model`` whose Activation modules compute ``fn`` (the reference with an exact backward)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, Activation):
            m.fn = fn
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator], ids=["hessian", "ggn"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_exact_products_pass(kind, operator, dtype):
    model, x, y = make_model(kind)
    model = copy.deepcopy(model).to(dtype)
    res = check(operator(model, F.cross_entropy, (x.to(dtype), y)), seed=0)
    assert res.ok, res
    assert res.tol == pytest.approx(torch.finfo(dtype).eps ** (1 / 3))
    assert res.rel_error < 1e-9 if dtype == torch.float64 else res.rel_error < 1e-3


@pytest.mark.parametrize("operator, dense", [(HessianOperator, dense_hessian), (GGNOperator, dense_ggn)],
                         ids=["hessian", "ggn"])
def test_finite_differences_approximate_the_exact_matrix_over_batches_and_blocks(operator, dense):
    model, x, y = make_model("conv_bn")
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]
    names = ["0.weight", "4.weight", "4.bias"]
    H = operator(model, F.cross_entropy, loader, params=names)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0))
    exact = dense(model, F.cross_entropy, loader, names=names) @ V
    torch.testing.assert_close(H.finite_differences(V, 6e-6), exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fn, exact_fn, loss_fn", [
    (ConstantSlopeTanh.apply, torch.tanh, F.cross_entropy),
    (OnceSoftplus.apply, F.softplus, lambda out, _: out.mean()),  # the last op: its incoming gradient is constant
], ids=["constant_slope", "once_differentiable"])
def test_hessian_that_drops_second_order_terms_is_flagged(fn, exact_fn, loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Activation(fn), nn.Linear(5, 3), Activation(fn)).double()
    data = _batch()
    H = HessianOperator(model, loss_fn, data)
    exact = dense_hessian(_with_activation(model, exact_fn), loss_fn, [data])
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    assert (H @ v - exact @ v).norm() > 0.1 * (exact @ v).norm()  # silently wrong, without any error
    res = check(H, seed=0)
    assert not res.ok and res.rel_error > 0.1
    with pytest.raises(FloatingPointError, match="not correctly twice differentiable"):
        HessianOperator(model, loss_fn, data, check=True)


def test_ggn_whose_jacobian_products_are_wrong_is_flagged():
    torch.manual_seed(0)
    model = Residual(DetachedGradTanh.apply).double()
    data = _batch()
    G = GGNOperator(model, F.cross_entropy, data)
    exact = dense_ggn(_with_activation(model, torch.tanh), F.cross_entropy, [data])
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0))
    assert (G @ v - exact @ v).norm() > 0.1 * (exact @ v).norm()  # silently wrong, without any error
    res = check(G, seed=0)
    assert not res.ok and res.rel_error > 0.1
    with pytest.raises(FloatingPointError, match="incoming gradient"):
        GGNOperator(model, F.cross_entropy, data, check=True)


@pytest.mark.parametrize("padding_idx", [0, -3])
def test_embedding_padding_rows_are_frozen_in_the_products_and_in_the_reference(padding_idx):
    torch.manual_seed(0)
    padded = TokenBag(sparse=False, padding_idx=padding_idx).double()
    twin = TokenBag(sparse=False).double()  # the same function, with a gradient for every row
    with torch.no_grad():
        padded.embed.weight[padding_idx] = torch.randn(4)
    twin.load_state_dict(padded.state_dict())
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 10, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)
    ids[:, 0] = padded.embed.padding_idx
    H = HessianOperator(padded, F.cross_entropy, (ids, y))
    keep = torch.ones(H.shape[0])
    row = padded.embed.padding_idx
    keep[row * 4:(row + 1) * 4] = 0
    full = dense_hessian(twin, F.cross_entropy, [(ids, y)])
    torch.testing.assert_close(H @ torch.eye(H.shape[0]), keep[:, None] * full * keep, rtol=1e-10, atol=1e-12)
    assert check(H, seed=0).ok and check(GGNOperator(padded, F.cross_entropy, (ids, y)), seed=0).ok


def test_check_at_construction_passes_exact_products_and_counts_them():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y), check=True)
    assert H.matvecs == 3
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(H @ v, dense_hessian(model, F.cross_entropy, [(x, y)]) @ v, rtol=1e-10, atol=1e-12)


def test_result_repr_and_bad_arguments():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    res = check(H, seed=0, probes=2, tol=1e-3)
    assert isinstance(res, CheckResult) and res.probes == 2 and res.tol == 1e-3
    assert repr(res).startswith("CheckResult(rel_error=") and "ok=True" in repr(res)
    with pytest.raises(TypeError, match="finite_differences"):
        check(torch.eye(3))
    with pytest.raises(ValueError, match="probes"):
        check(H, probes=0)
    with pytest.raises(ValueError, match="tol"):
        check(H, tol=0.0)
