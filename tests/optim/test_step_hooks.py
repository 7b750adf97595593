"""The step-hook shim reads torch's private hook registries: it must behave as the installed torch's own wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from curvkit.optim import AdaHessian


class TorchWrapped(torch.optim.Optimizer):
    """A plain torch optimizer: torch wraps its ``step`` with the installed version's own hook wrapper."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        with torch.enable_grad():
            return closure()


def _hook_calls(make):
    """Every hook call around two steps, the second with a pre-hook that replaces the closure."""
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    opt = make(model.parameters())
    calls, losses = [], []
    small = lambda: F.cross_entropy(model(x[:2]), y[:2])  # noqa: E731

    def replace(o, args, kwargs):
        calls.append(("pre", len(args), sorted(kwargs)))
        return ((o, small), {}) if len(calls) > 3 else None

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", len(a), sorted(k)))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", a[1:] == (small,)))),
        opt.register_step_pre_hook(replace),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[1:] == (small,), sorted(k)))),
    ]
    try:
        losses.append(float(opt.step(closure=lambda: F.cross_entropy(model(x), y))))
        losses.append(float(opt.step(lambda: F.cross_entropy(model(x), y))))
    finally:
        for h in handles:
            h.remove()
    return calls, losses[1] == pytest.approx(float(small()))


def test_hooks_run_in_the_order_and_with_the_arguments_of_torchs_own_wrapper():
    ours = _hook_calls(lambda p: AdaHessian(p, lr=0.0, seed=0))
    theirs = _hook_calls(TorchWrapped)
    assert ours == theirs
    assert ours[1] and len(ours[0]) == 8                  # the replaced closure ran; 4 hooks x 2 steps


@pytest.mark.parametrize("make", [lambda p: AdaHessian(p, seed=0), TorchWrapped])
def test_a_pre_hook_returning_something_else_is_refused_as_torch_refuses_it(make):
    model = nn.Linear(3, 2)
    opt = make(model.parameters())
    opt.register_step_pre_hook(lambda o, a, k: "not a pair")
    with pytest.raises(RuntimeError, match="pre.hook|must return"):
        opt.step(lambda: model(torch.ones(1, 3)).sum())
