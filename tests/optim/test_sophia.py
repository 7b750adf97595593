"""Sophia: the clipped diagonal-Newton update, both curvature estimators, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.optim import Sophia


def test_unclipped_step_on_a_diagonal_quadratic_is_a_newton_step():
    a = torch.tensor([0.5, 2.0, 10.0])
    b = torch.tensor([0.1, -0.3, 2.0])
    theta = torch.zeros(3, requires_grad=True)
    opt = Sophia([theta], lr=1.0, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, update_each=1, seed=0)
    opt.step(lambda: 0.5 * (a * theta**2).sum() - (b * theta).sum())
    # h = z * (a z) = a exactly; m = g = -b; step = clip(m / a, 1): Newton where |b / a| <= 1, else clipped
    torch.testing.assert_close(theta.detach(), torch.tensor([0.2, -0.15, 0.2]))


def test_every_coordinate_moves_at_most_lr_and_curvature_refreshes_every_k_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt = Sophia(model.parameters(), lr=0.01, weight_decay=0.0, update_each=3, seed=0)
    h = []
    for _ in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(lambda: F.cross_entropy(model(x), y))
        for p, q in zip(model.parameters(), before):
            assert (p.detach() - q).abs().max() <= 0.01 + 1e-7
        h.append(opt.state[model[0].weight]["hessian"].clone())
    assert torch.equal(h[0], h[1]) and torch.equal(h[1], h[2]) and not torch.equal(h[2], h[3])


def test_gauss_newton_bartlett_estimator_trains_and_is_non_negative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = Sophia(model.parameters(), lr=0.02, estimator="gnb", update_each=2, seed=0)

    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    first = opt.step(closure).item()
    for _ in range(60):
        last = opt.step(closure).item()
    assert last < first
    assert all(opt.state[p]["hessian"].min() >= 0 for p in model.parameters())


def test_gnb_needs_logits():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    opt = Sophia(model.parameters(), estimator="gnb", seed=0)
    with pytest.raises(ValueError, match="logits"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="closure returning"):
        opt.step()


def test_callable_estimator_output_is_the_curvature():
    seen = []

    def absolute_gradient(params, grads, generator):
        seen.append(len(params))
        return [g.detach().abs() for g in grads]

    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    opt = Sophia(model.parameters(), estimator=absolute_gradient, betas=(0.9, 0.99), seed=0)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert seen == [2]
    for p, g in zip(model.parameters(), grads):   # h = b2 * 0 + (1 - b2) * |g| after one refresh
        torch.testing.assert_close(opt.state[p]["hessian"], 0.01 * g.abs())


def test_gnb_takes_sequence_logits_that_reshape_must_copy():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    twin = nn.Linear(5, 3)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 6, 5), torch.randint(0, 3, (6, 4))

    def strided():
        logits = model(x).transpose(0, 1)               # (time, batch, classes), not contiguous
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)), logits

    def contiguous():
        logits = twin(x.transpose(0, 1).contiguous())
        return F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)), logits

    a = Sophia(model.parameters(), lr=0.02, estimator="gnb", update_each=1, seed=0)
    b = Sophia(twin.parameters(), lr=0.02, estimator="gnb", update_each=1, seed=0)
    a.step(strided)
    b.step(contiguous)
    for p, q in zip(model.parameters(), twin.parameters()):   # same rows, same sampled labels, same estimate
        assert a.state[p]["hessian"].abs().sum() > 0
        torch.testing.assert_close(a.state[p]["hessian"], b.state[q]["hessian"])
