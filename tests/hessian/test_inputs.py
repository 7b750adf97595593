"""input_hvp against the dense Hessian of each example's own loss w.r.t. its input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.hessian import input_hvp
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
