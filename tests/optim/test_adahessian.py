"""AdaHessian: exact answers on quadratics, real training, resume, and every documented behaviour."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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




class _Heads(nn.Module):
    """Causal two-head self-attention as GPT-2 runs it (4-D q, k, v): its fused CPU kernel has no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8 * 5, 3)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, 2, 4).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(batch, -1))


def test_attention_with_fused_kernels_trains_through_the_closure_and_the_backward_path_says_what_to_do():
    from curvkit.hessian import twice_differentiable

    torch.manual_seed(0)
    model = _Heads().float()
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 5, 8, dtype=torch.float32), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match="flash_attention"):   # what plain autograd does on this model
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()), create_graph=True)
        torch.autograd.grad(g, list(model.parameters()), [torch.ones_like(t) for t in g])
    a, b = AdaHessian(model.parameters(), seed=0), AdaHessian(twin.parameters(), seed=0)
    for _ in range(3):
        a.step(lambda: F.cross_entropy(model(x), y))
        b.zero_grad()
        with twice_differentiable():
            F.cross_entropy(twin(x), y).backward(create_graph=True)
        b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    b.zero_grad()
    F.cross_entropy(twin(x), y).backward(create_graph=True)            # the fused kernel: no double backward
    with pytest.raises(RuntimeError, match=r"pass a closure.*twice_differentiable\(\)"):
        b.step()
