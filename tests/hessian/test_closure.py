"""ClosureHessianOperator against dense float64 Hessians: products, gradient, loss, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import ClosureHessianOperator, cg, eigenvalues
from tests._models import MODEL_KINDS, hessian_case, make_model


def _operator(kind: str):
    model, (x, y), D = hessian_case(kind)
    return ClosureHessianOperator(model.parameters(), lambda: F.cross_entropy(model(x), y)), model, (x, y), D


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_products_gradient_and_loss_equal_the_dense_ones(kind):
    H, model, (x, y), D = _operator(kind)
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(0))
    HV = H @ V
    torch.testing.assert_close(HV, D @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(V.T @ HV, (V.T @ HV).T, rtol=1e-10, atol=1e-12)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(H.gradient, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-14)
    assert torch.equal(H.loss, loss.detach()) and H.gradient.dtype == torch.float64 and H.matvecs == 3


def test_vector_forms_and_algorithms_agree_with_the_dense_matrix():
    H, model, _, D = _operator("tanh_mlp")
    v = torch.randn(D.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H.flatten(H @ H.split(v)), D @ v, rtol=1e-10, atol=1e-12)
    assert [t.shape for t in H @ H.split(v)] == [p.shape for p in model.parameters()]
    torch.testing.assert_close((H @ v.float()).double(), D @ v, rtol=1e-5, atol=1e-6)
    sol = cg(H, -H.gradient, max_iter=200, tol=1e-12, damping=0.5)
    torch.testing.assert_close(sol.x, torch.linalg.solve(D + 0.5 * torch.eye(D.shape[0]), -H.gradient),
                               rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(eigenvalues(H, k=1, tol=1e-10, seed=0).values, torch.linalg.eigvalsh(D)[-1:],
                               rtol=1e-9, atol=1e-12)


def test_the_closure_runs_once_and_the_tensors_are_left_alone():
    model, x, y = make_model("tanh_mlp")
    model[2].bias.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        return F.cross_entropy(model(x), y)

    H = ClosureHessianOperator([p for p in model.parameters() if p.requires_grad], closure)
    H @ torch.randn(H.shape[0], 4)
    assert len(calls) == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for p in list(model.parameters())[1:]) and not model[2].bias.requires_grad


def test_tensors_outside_the_loss_or_with_constant_gradient_have_zero_blocks():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    linear = torch.tensor([3.0], requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    H = ClosureHessianOperator([w, linear, unused], lambda: (w ** 4).sum() + 5 * linear.sum())
    dense = torch.diag(torch.tensor([12.0, 48.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(H @ torch.eye(5), dense)
    assert H.gradient.tolist() == [4.0, -32.0, 5.0, 0.0, 0.0]
    constant = ClosureHessianOperator([linear], lambda: 2 * linear.sum())
    assert (constant @ torch.ones(1)).tolist() == [0.0]


def test_products_after_the_tensors_changed_raise():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    H = ClosureHessianOperator([w], lambda: (w ** 3).sum())
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        H @ torch.ones(2)


def test_bad_params_and_closures_are_refused_with_what_to_do():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="empty"):
        ClosureHessianOperator([], lambda: w.sum())
    with pytest.raises(TypeError, match="require grad"):
        ClosureHessianOperator([torch.ones(3)], lambda: w.sum())
    with pytest.raises(TypeError, match="floating-point"):
        ClosureHessianOperator([torch.ones(3, dtype=torch.long)], lambda: w.sum())
    with pytest.raises(ValueError, match="scalar"):
        ClosureHessianOperator([w], lambda: w * 2)
    with pytest.raises(ValueError, match="scalar"):
        ClosureHessianOperator([w], lambda: 3.0)
    with pytest.raises(ValueError, match="does not require grad"):
        ClosureHessianOperator([w], lambda: w.sum().detach())
    with pytest.raises(FloatingPointError, match="nan"):
        ClosureHessianOperator([w], lambda: (w * float("nan")).sum())
