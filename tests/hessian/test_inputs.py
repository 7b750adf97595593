"""InputHessianOperator and input_hvp against the dense Hessian of each example's own function of its input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.hessian import InputHessianOperator, input_hvp, steihaug
from tests._models import assert_untouched_by, make_model


def _per_example(model, loss_fn, x, y, v):
    """Rows H_i v_i and gradients, each H_i by torch.autograd.functional.hessian of example i alone."""
    hv, grads = [], []
    for i in range(len(x)):
        def loss(xi):
            return loss_fn(model(xi.view_as(x[i])[None]), y[i:i + 1])

        H = torch.autograd.functional.hessian(loss, x[i].reshape(-1))
        hv.append((H @ v[i].reshape(-1)).view_as(x[i]))
        xi = x[i].reshape(-1).clone().requires_grad_()
        grads.append(torch.autograd.grad(loss(xi), xi)[0].view_as(x[i]))
    return torch.stack(hv), torch.stack(grads)


def _direction(x, seed=1):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["tanh_mlp", "conv_bn"])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(reduction="sum")], ids=["mean", "sum"])
def test_matches_each_examples_own_hessian(kind, loss_fn):
    model, x, y = make_model(kind)
    x, y = x[:6], y[:6]
    v = _direction(x)
    want_hv, want_grad = _per_example(model, loss_fn, x, y, v)
    hv, grad = input_hvp(model, loss_fn, x, y, v, return_grad=True)
    assert hv.shape == x.shape and not hv.requires_grad
    torch.testing.assert_close(hv, want_hv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(input_hvp(model, loss_fn, x, y, v), hv)


def test_losses_vmap_cannot_batch_are_evaluated_one_example_at_a_time():
    model, x, y = make_model("tanh_mlp")
    x, y = x[:5], y[:5]
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]), label_smoothing=0.1)
    v = _direction(x)
    torch.testing.assert_close(input_hvp(model, loss_fn, x, y, v), _per_example(model, loss_fn, x, y, v)[0],
                               rtol=1e-10, atol=1e-12)


def test_regression_loss_per_example_mean_over_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    v = _direction(x)
    torch.testing.assert_close(input_hvp(model, F.mse_loss, x, y, v), _per_example(model, F.mse_loss, x, y, v)[0],
                               rtol=1e-10, atol=1e-12)


def test_batch_statistics_couple_the_examples():
    model, x, y = make_model("conv_bn")
    x, y = x[:3], y[:3]
    v = _direction(x)
    train_copy = copy.deepcopy(model).train()
    H = torch.autograd.functional.hessian(
        lambda flat: 3 * F.cross_entropy(train_copy(flat.view_as(x)), y), x.reshape(-1))
    hv = input_hvp(model, F.cross_entropy, x, y, v, bn_mode="batch")
    torch.testing.assert_close(hv, (H @ v.reshape(-1)).view_as(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(hv, input_hvp(model, F.cross_entropy, x, y, v))


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_model_is_never_mutated(bn_mode):
    def products(model, x, y):
        inputs = x.clone()
        input_hvp(model, F.cross_entropy, inputs, y, _direction(x), bn_mode=bn_mode, return_grad=True)
        assert torch.equal(inputs, x) and inputs.grad is None and not inputs.requires_grad

    assert_untouched_by(products)


def test_loss_linear_in_the_inputs_gives_zero():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    hv, grad = input_hvp(model, lambda out, t: (out * t).sum(), x, y, _direction(x), return_grad=True)
    assert hv.abs().max() == 0 and grad.abs().max() > 0


def _margin(outputs, pair):
    """True logit minus target logit for one example: pair = (true class, target class)."""
    picked = outputs.gather(1, pair)
    return picked[0, 0] - picked[0, 1]


def _dense_blocks(model, fn, x, t):
    """(B, n, n) exact per-example Hessians, each by torch.autograd.functional.hessian of example i alone."""
    return torch.stack([torch.autograd.functional.hessian(
        lambda xi, i=i: fn(model(xi.view_as(x[i])[None]), t[i:i + 1]), x[i].reshape(-1)) for i in range(len(x))])


@pytest.mark.parametrize("kind", ["tanh_mlp", "conv_bn"])
def test_operator_is_the_batch_of_per_example_margin_hessians(kind):
    model, x, y = make_model(kind)
    x, pair = x[:5], torch.stack([y[:5], (y[:5] + 1) % 3], 1)
    H = InputHessianOperator(model, _margin, x, pair)
    n = x[0].numel()
    assert H.shape == (5, n, n) and H.dtype == x.dtype and H.device == x.device
    dense = _dense_blocks(model, _margin, x, pair)
    V = _direction(x).reshape(5, n)
    torch.testing.assert_close(H @ V, torch.einsum("bij,bj->bi", dense, V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H @ V.view_as(x), (H @ V).view_as(x))
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(H.outputs, logits)
    torch.testing.assert_close(H.values, logits.gather(1, pair) @ torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(H.gradient, input_hvp(model, _margin, x, pair, V.view_as(x), return_grad=True)[1])
    assert H.matvecs == 3 and not H.gradient.requires_grad


def test_products_reuse_the_cached_graph():
    model, x, y = make_model("tanh_mlp")
    forwards = []
    handle = model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        H = InputHessianOperator(model, F.cross_entropy, x, y)
        for seed in range(3):
            H @ _direction(x, seed)
    finally:
        handle.remove()
    assert len(forwards) == 1 and H.matvecs == 3


def test_steihaug_over_the_operator_solves_every_examples_subproblem():
    model, x, y = make_model("tanh_mlp")
    x, pair = x[:4], torch.stack([y[:4], (y[:4] + 2) % 3], 1)
    H = InputHessianOperator(model, _margin, x, pair)
    dense = _dense_blocks(model, _margin, x, pair)
    radius = torch.tensor([0.1, 0.5, 1.0, 3.0])
    got = steihaug(H, H.gradient, radius, tol=1e-10)
    want = steihaug(dense, H.gradient, radius, tol=1e-10)
    torch.testing.assert_close(got.x, want.x, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got.iterations, want.iterations)


def test_batch_statistics_make_one_coupled_operator():
    model, x, y = make_model("conv_bn")
    x, y = x[:3], y[:3]
    H = InputHessianOperator(model, F.cross_entropy, x, y, bn_mode="batch")
    assert H.shape == (x.numel(), x.numel())
    v = _direction(x)
    torch.testing.assert_close(H @ v.reshape(-1), (H @ v).reshape(-1))
    torch.testing.assert_close(H @ v, input_hvp(model, F.cross_entropy, x, y, v, bn_mode="batch"))


# ---------------------------------------------------------------- bad input


def test_ignored_targets_have_no_loss_of_their_own():
    model, x, y = make_model("tanh_mlp")
    y = y.clone()
    y[2] = -100
    with pytest.raises(FloatingPointError, match=r"example\(s\) \[2\]"):
        input_hvp(model, F.cross_entropy, x, y, _direction(x))


def test_class_targets_out_of_range_are_refused():
    model, x, y = make_model("tanh_mlp")
    y = y.clone()
    y[4] = 7
    with pytest.raises(ValueError, match="class target 7 is out of range for 3 classes"):
        input_hvp(model, F.cross_entropy, x, y, _direction(x))


def test_bad_arguments_are_refused():
    model, x, y = make_model("tanh_mlp")
    v = _direction(x)
    with pytest.raises(ValueError, match="shaped like inputs"):
        input_hvp(model, F.cross_entropy, x, y, v[:, :2])
    with pytest.raises(TypeError, match="floating-point"):
        input_hvp(model, F.cross_entropy, x.long(), y, v)
    with pytest.raises(ValueError, match="one row per example"):
        input_hvp(model, F.cross_entropy, x, y[:3], v)
    with pytest.raises(ValueError, match="scalar"):
        input_hvp(model, nn.MSELoss(reduction="none"), x, torch.randn(len(x), 3), v)
    dropout = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double().train()
    with pytest.raises(ValueError, match="Dropout"):
        input_hvp(dropout, F.cross_entropy, x, y, v)


def test_operator_refuses_vectors_of_the_wrong_shape():
    model, x, y = make_model("tanh_mlp")
    H = InputHessianOperator(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match=r"shape \(24, 5\)"):
        H @ torch.ones(24 * 5)
    with pytest.raises(TypeError, match="floating-point"):
        H @ torch.ones(24, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="bn_mode"):
        InputHessianOperator(model, F.cross_entropy, x, y, bn_mode="train")
    with pytest.raises(TypeError, match="callable"):
        InputHessianOperator(model, None, x, y)
