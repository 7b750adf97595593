"""Closures that run backward themselves (Lightning's automatic optimization does), for every diagonal-curvature
optimizer of the registry; CrAM's own test is in test_cram.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests._models import flat_params, small_classifier


def _lightning_style(model, opt, x, y):
    """What Lightning's closure does: zero the gradients, backward, return the detached loss."""

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=opt.next_step_needs_graph())
        return loss.detach()

    return closure


def test_a_closure_that_ran_backward_with_the_graph_follows_the_plain_closure(diagonal_case):
    model, x, y = small_classifier()
    twin = copy.deepcopy(model)
    make = diagonal_case.make
    a, b = make(model.parameters(), seed=5, update_each=2), make(twin.parameters(), seed=5, update_each=2)
    for _ in range(5):
        loss_a = a.step(lambda: F.cross_entropy(model(x), y))
        loss_b = b.step(_lightning_style(twin, b, x, y))
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)
    assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in twin.parameters())


def test_gradients_accumulated_before_the_closure_count_in_gradient_and_curvature(diagonal_case):
    model, x, y = small_classifier()
    twin = copy.deepcopy(model)
    make = diagonal_case.make
    a, b = make(model.parameters(), seed=5, update_each=1), make(twin.parameters(), seed=5, update_each=1)
    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.zero_grad(set_to_none=True)
        (F.cross_entropy(twin(x[:16]), y[:16]) / 2).backward(create_graph=True)   # an earlier micro-batch

        def second_half():
            loss = F.cross_entropy(twin(x[16:]), y[16:]) / 2
            loss.backward(create_graph=True)
            return loss.detach()

        b.step(second_half)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)


def test_a_closure_that_ran_a_plain_backward_on_a_curvature_step_says_what_to_do(diagonal_case):
    model, x, y = small_classifier()
    opt = diagonal_case.make(model.parameters(), update_each=2)

    def plain():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    before = flat_params(model)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*CurvatureModule"):
        opt.step(plain)
    assert torch.equal(before, flat_params(model))
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert not opt.next_step_needs_graph()
    opt.step(plain)                                   # a step that does not refresh the curvature needs no graph
    assert not torch.equal(before, flat_params(model))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_closure_returning_the_loss_is_differentiated_whatever_it_did_to_grad(diagonal_case, set_to_none):
    model, x, y = small_classifier()
    twin = copy.deepcopy(model)
    make = diagonal_case.make
    a, b = make(model.parameters(), seed=5, update_each=2), make(twin.parameters(), seed=5, update_each=2)

    def zeroing():  # a torch-style closure with its backward removed: zero_grad stays, harmlessly
        b.zero_grad(set_to_none=set_to_none)
        return F.cross_entropy(twin(x), y)

    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.step(zeroing)
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-12, atol=0)


def test_next_step_needs_graph_follows_update_each_and_the_estimator(diagonal_case):
    model, x, y = small_classifier()
    opt = diagonal_case.make(model.parameters(), update_each=3)
    seen = []
    for _ in range(7):
        seen.append(opt.next_step_needs_graph())
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert seen == [True, False, False, True, False, False, True]
    gnb = diagonal_case.make(model.parameters(), estimator="gnb", update_each=1)
    assert not gnb.next_step_needs_graph()            # GNB differentiates a sampled loss, not the gradient


def test_a_closure_returning_none_steps_on_grad_and_is_refused_without_one(diagonal_case):
    model, x, y = small_classifier()
    twin = copy.deepcopy(model)
    a, b = diagonal_case.make(model.parameters(), seed=5), diagonal_case.make(twin.parameters(), seed=5)
    with pytest.raises(ValueError, match="NoneType"):
        b.step(lambda: None)                          # nothing to step on: the closure forgot its return
    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward(create_graph=True)
        assert b.step(lambda: None) is None           # how Lightning steps manual optimization after backward
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-10, atol=1e-12)


def test_a_torch_style_closure_that_backwards_and_returns_the_graph_says_what_to_do(diagonal_case):
    model, x, y = small_classifier()
    opt = diagonal_case.make(model.parameters(), update_each=2)

    def torch_style():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for refresh in (True, False):                         # a curvature step, then a plain one
        assert opt.next_step_needs_graph() is refresh
        before = flat_params(model)
        with pytest.raises(RuntimeError, match=r"return loss_fn\(model\(x\), y\) without calling backward"):
            opt.step(torch_style)
        assert torch.equal(before, flat_params(model))
        opt.step(lambda: F.cross_entropy(model(x), y))
