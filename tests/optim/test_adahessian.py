"""AdaHessian: exact answers on quadratics, real training, resume, and every documented behaviour."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from curvkit.optim import AdaHessian


def _quadratic(a, b):
    """f(theta) = 1/2 sum a_i theta_i^2 - b . theta: diagonal Hessian diag(a), minimiser b / a."""
    theta = torch.zeros(len(a), requires_grad=True)
    return theta, lambda: 0.5 * (a * theta**2).sum() - (b * theta).sum()


def test_first_step_on_a_diagonal_quadratic_is_the_newton_step():
    a = torch.tensor([0.5, 2.0, 10.0, 40.0])
    b = torch.tensor([1.0, -3.0, 2.0, 5.0])
    for betas in [(0.0, 0.0), (0.9, 0.999)]:
        theta, f = _quadratic(a, b)
        opt = AdaHessian([theta], lr=1.0, betas=betas, eps=1e-12, seed=0)
        opt.step(f)
        torch.testing.assert_close(theta.detach(), b / a, rtol=1e-10, atol=1e-12)


def test_update_each_bias_correction_matches_a_hand_computed_reference():
    a = torch.tensor([0.5, 2.0, 10.0])
    b = torch.tensor([1.0, -3.0, 2.0])
    lr, (b1, b2), eps, k = 0.3, (0.8, 0.9), 1e-4, 0.5
    theta, f = _quadratic(a, b)
    opt = AdaHessian([theta], lr=lr, betas=(b1, b2), eps=eps, hessian_power=k, update_each=3, seed=0)
    ref = torch.zeros(3)
    m = torch.zeros(3)
    v = torch.zeros(3)
    updates = 0
    for t in range(1, 8):
        opt.step(f)
        g = a * ref - b
        m = b1 * m + (1 - b1) * g
        if (t - 1) % 3 == 0:  # curvature refreshed on steps 1, 4, 7 with D = z * (a z) = a exactly
            v = b2 * v + (1 - b2) * a**2
            updates += 1
        ref = ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**updates)) ** (k / 2) + eps)
        torch.testing.assert_close(theta.detach(), ref, rtol=1e-10, atol=1e-12)


def test_rosenbrock_converges():
    theta = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = AdaHessian([theta], lr=2.0, seed=0)

    def rosenbrock():
        return (1 - theta[0]) ** 2 + 100 * (theta[1] - theta[0] ** 2) ** 2

    start = rosenbrock().item()
    for _ in range(3000):
        opt.step(rosenbrock)
    assert rosenbrock().item() < 1e-2 < start
    torch.testing.assert_close(theta.detach(), torch.ones(2), atol=0.1, rtol=0)


def _train_digits(make_opt, closure_style, epochs, seed):
    """Test accuracy of a 64-32-10 tanh MLP on sklearn's digits (the split, init and batches follow ``seed``)."""
    from curvkit.datasets import load_digits_tensors

    (X, y), (Xt, yt) = load_digits_tensors(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).float()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            if closure_style:
                opt.step(lambda: F.cross_entropy(model(X[idx]), y[idx]))
            else:
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
    with torch.no_grad():
        return (model(Xt).argmax(1) == yt).float().mean().item()


def test_digits_mlp_reaches_adams_accuracy():
    """Mean test accuracy over 5 seeds after 4 epochs: AdaHessian at its default lr against Adam at every lr of
    a grid, the best picked on the test set itself (a bar in Adam's favour). Measured: 96.7% against 96.8%
    (Adam lr 1e-2) and 94.9% (Adam lr 3e-3); single seeds vary by about a point, hence the mean."""
    seeds, epochs = range(5), 4
    ada = statistics.fmean(_train_digits(lambda p: AdaHessian(p, seed=s), True, epochs, s) for s in seeds)
    adam = {lr: statistics.fmean(_train_digits(lambda p: torch.optim.Adam(p, lr=lr), False, epochs, s) for s in seeds)
            for lr in (1e-3, 3e-3, 1e-2)}
    assert ada >= adam[3e-3]                       # beats Adam at PyTorch's usual small-model lr
    assert ada >= max(adam.values()) - 0.01, (ada, adam)   # and matches Adam tuned on the test set, to a point


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d, (8, 2, 9)), (nn.Conv2d, (8, 2, 7, 7)), (nn.Conv3d, (8, 2, 5, 5, 5)),
])
def test_conv_models_of_every_rank_train(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(*shape)
    y = torch.randint(0, 4, (shape[0],))
    model(x)
    opt = AdaHessian(model.parameters(), lr=0.1, seed=0)
    first = opt.step(lambda: F.cross_entropy(model(x), y)).item()
    for _ in range(30):
        last = opt.step(lambda: F.cross_entropy(model(x), y)).item()
    assert last < first
    v = opt.state[model[0].weight]["exp_hessian_diag_sq"]
    flat = v.flatten(2)
    torch.testing.assert_close(flat, flat[..., :1].expand_as(flat))  # averaged over the kernel window


@pytest.mark.parametrize("fused", [None, False])   # the kernels where built, and the PyTorch path
def test_spatial_average_keeps_the_sign_and_leaves_vectors_alone(fused):
    weight = torch.zeros(1, 1, 3, requires_grad=True)       # a Conv1d weight: one window of 3 taps
    bias = torch.zeros(3, requires_grad=True)
    diag = torch.tensor([1.0, -3.0, 5.0])
    opt = AdaHessian([weight, bias], betas=(0.9, 0.5), seed=0, fused=fused,
                     estimator=lambda params, grads, gen: [diag.view(1, 1, 3), diag])   # exact diagonals
    opt.step(lambda: (weight**2).sum() + (bias**2).sum())
    # signed mean over the window is (1 - 3 + 5) / 3 = 1, so v = (1 - b2) * 1^2; |D| averaged would give 9
    torch.testing.assert_close(opt.state[weight]["exp_hessian_diag_sq"], torch.full((1, 1, 3), 0.5))
    torch.testing.assert_close(opt.state[bias]["exp_hessian_diag_sq"], 0.5 * diag**2)


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(32, 6)
    y = torch.randint(0, 3, (32,))
    return model, x, y


def test_resume_from_state_dict_is_bit_exact_regardless_of_global_rng():
    model, x, y = _model_and_data()
    opt = AdaHessian(model.parameters(), lr=0.1, update_each=2, n_samples=2, seed=123)
    closure = lambda m: (lambda: F.cross_entropy(m(x), y))  # noqa: E731
    for _ in range(3):
        opt.step(closure(model))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.step(closure(model))

    resumed = _model_and_data()[0]
    resumed.load_state_dict(saved_model)
    opt2 = AdaHessian(resumed.parameters(), lr=0.1, update_each=2, n_samples=2, seed=999)
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(777)
    for _ in range(4):
        opt2.step(closure(resumed))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_closure_and_backward_paths_agree_and_leave_graph_free_grads():
    model, x, y = _model_and_data()
    twin = copy.deepcopy(model)
    a = AdaHessian(model.parameters(), lr=0.1, seed=5)
    b = AdaHessian(twin.parameters(), lr=0.1, seed=5)
    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward(create_graph=True)
        b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
        assert q.grad.grad_fn is None and not q.grad.requires_grad  # reference cycle broken


def test_plain_backward_on_a_curvature_step_explains_what_to_do():
    model, x, y = _model_and_data()
    opt = AdaHessian(model.parameters(), update_each=2, seed=0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # step 2 does not refresh curvature: a plain backward is enough
    opt.step()


def test_non_curvature_steps_cost_a_plain_backward(monkeypatch):
    model, x, y = _model_and_data()
    opt = AdaHessian(model.parameters(), update_each=3, seed=0)
    calls = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert calls == [True, False, False, False]  # step 1: grad with graph + one Hessian product


def test_parameters_without_curvature_or_gradient():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.unused = nn.Parameter(torch.ones(2))
            self.shift = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.lin(x) + self.shift

    model = Model()
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    opt = AdaHessian(model.parameters(), lr=0.1, seed=0)
    before = model.unused.detach().clone()
    for _ in range(5):
        loss = opt.step(lambda: F.mse_loss(model(x), y))
    assert torch.isfinite(loss)
    assert torch.equal(model.unused.detach(), before) and model.unused.grad is None
    assert opt.state[model.shift]["exp_hessian_diag_sq"].abs().max() > 0  # mse: the shift has curvature


def test_lr_scheduler_and_param_groups():
    model, x, y = _model_and_data()
    opt = AdaHessian([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}], lr=0.1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    frozen = model[2].weight.detach().clone()
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert torch.equal(model[2].weight.detach(), frozen)


def test_same_seed_same_trajectory_and_global_rng_untouched():
    runs = []
    for _ in range(2):
        model, x, y = _model_and_data()
        opt = AdaHessian(model.parameters(), seed=3)
        state = torch.get_rng_state()
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(x), y))
        assert torch.equal(state, torch.get_rng_state())
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(hessian_power=1.5), "hessian_power"),
    (dict(update_each=0), "update_each"),
    (dict(n_samples=0), "n_samples"),
    (dict(estimator="exact"), "estimator"),
    (dict(fused="yes"), "fused"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaHessian(nn.Linear(2, 2).parameters(), **kwargs)


def test_bad_closure_results_raise():
    model, x, y = _model_and_data()
    opt = AdaHessian(model.parameters(), seed=0)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())


def test_step_hooks_run_once_and_the_profiler_sees_the_step():
    model, x, y = _model_and_data()
    opt = AdaHessian(model.parameters(), lr=0.1, seed=0)
    calls = []
    other = lambda: F.cross_entropy(model(x[:8]), y[:8])  # noqa: E731
    opt.register_step_pre_hook(lambda o, args, kwargs: (calls.append("pre"), ((other,), kwargs))[1])
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args[0] is other)))
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
    assert any(e.name == "Optimizer.step#AdaHessian.step" for e in prof.events())
