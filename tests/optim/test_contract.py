"""The contract every curvkit optimizer keeps (registry in conftest.py): resume, groups, schedulers,
closure and backward paths, bad hyperparameters, the global RNG, step hooks, and the preconditioner."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests._models import flat_params, small_classifier


def test_resume_from_state_dict_is_bit_exact_regardless_of_global_rng(case):
    model, x, y = small_classifier()
    opt = case.make(model.parameters(), seed=123)
    closure = lambda m: (lambda: F.cross_entropy(m(x), y))  # noqa: E731
    for _ in range(3):
        opt.step(closure(model))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.step(closure(model))
    resumed = small_classifier()[0]
    resumed.load_state_dict(saved_model)
    opt2 = case.make(resumed.parameters(), seed=999)
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(777)
    for _ in range(4):
        opt2.step(closure(resumed))
    assert torch.equal(flat_params(model), flat_params(resumed))


def test_param_groups_and_lr_scheduler(case):
    model, x, y = small_classifier()
    opt = case.make([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    frozen, moving = model[2].weight.detach().clone(), model[0].weight.detach().clone()
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert torch.equal(model[2].weight.detach(), frozen) and not torch.equal(model[0].weight.detach(), moving)


def test_closure_and_backward_paths_agree_and_leave_graph_free_grads(case):
    model, x, y = small_classifier()
    if not case.backward:  # a closure-only optimizer says so instead of stepping on stale gradients
        F.cross_entropy(model(x), y).backward(create_graph=True)
        with pytest.raises((RuntimeError, ValueError, TypeError), match="closure"):
            case.make(model.parameters()).step()
        return
    twin = copy.deepcopy(model)
    a, b = case.make(model.parameters(), seed=5), case.make(twin.parameters(), seed=5)
    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward(create_graph=True)
        b.step()
    torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-6, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
        assert q.grad.grad_fn is None and not q.grad.requires_grad  # no parameter <-> gradient cycle survives


def test_bad_hyperparameters_raise_and_say_which(case):
    assert case.bad, "every optimizer registers its bad inputs"
    for kwargs, match in case.bad:
        with pytest.raises(ValueError, match=match):
            case.make(nn.Linear(2, 2).parameters(), **kwargs)


def test_bad_closure_results_raise(case):
    model, x, y = small_classifier()
    opt = case.make(model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())


def test_same_seed_same_trajectory_and_global_rng_untouched(case):
    runs = []
    for _ in range(2):
        model, x, y = small_classifier()
        opt = case.make(model.parameters(), seed=3)
        state = torch.get_rng_state()
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(x), y))
        assert torch.equal(state, torch.get_rng_state())
        runs.append(flat_params(model))
    assert torch.equal(runs[0], runs[1])


def test_step_hooks_run_once_and_the_profiler_sees_the_step(case):
    model, x, y = small_classifier()
    opt = case.make(model.parameters())
    calls = []
    other = lambda: F.cross_entropy(model(x[:8]), y[:8])  # noqa: E731
    opt.register_step_pre_hook(lambda o, args, kwargs: (calls.append("pre"), ((o, other), kwargs))[1])
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args[1] is other)))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global"))
    expected = other().detach()
    try:
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
    finally:
        handle.remove()
    assert calls == ["global", "pre", ("post", True)]          # once each: Optimizer did not wrap step again
    assert torch.equal(loss, expected)                        # the step ran the pre hook's closure
    with torch.profiler.profile() as prof:
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert any(e.name == f"Optimizer.step#{type(opt).__name__}.step" for e in prof.events())


def test_preconditioner_is_what_the_step_divides_by(case):
    model, x, y = small_classifier()
    opt = case.make(model.parameters(), weight_decay=0.0)
    assert opt.preconditioner() is None                       # no state yet
    assert opt.stability_threshold() > 0
    for _ in range(2):
        before = flat_params(model).double()
        opt.step(lambda: F.cross_entropy(model(x), y))
    if not case.preconditioned:
        return
    P = opt.preconditioner()
    m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in model.parameters()]).double()
    lr = opt.param_groups[0]["lr"]
    step = before - flat_params(model).double()
    unclipped = (m / P).abs() < 1                             # Sophia moves clipped coordinates by lr * sign
    assert P.shape == step.shape and bool((P > 0).all()) and unclipped.any()
    torch.testing.assert_close(step[unclipped], (lr * m / P)[unclipped], rtol=1e-5, atol=1e-9)
    sub = list(model[2].parameters())
    torch.testing.assert_close(opt.preconditioner(sub), P[-sum(p.numel() for p in sub):])
    with pytest.raises(ValueError, match="not optimized"):
        opt.preconditioner([torch.zeros(3)])


def test_loading_a_state_saved_with_other_settings_is_refused(case):
    model, x, y = small_classifier()
    name, saved, other = case.setting
    opt = case.make(model.parameters(), **{name: saved})
    opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match=name):
        case.make(model.parameters(), **{name: other}).load_state_dict(opt.state_dict())
