"""trust_region against closed-form and brute-force minimal perturbations, and its borrowing and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from curvkit.attacks import AttackResult, trust_region
from tests._models import assert_untouched_by


def _linear(classes: int = 5, features: int = 8, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, classes).double()


def _points(rows: int, features: int, seed: int = 1, low: float = 0.3, high: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(rows, features, generator=g, dtype=torch.float64)


def _closed_form_linear(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, kappa: float, norm: str) -> torch.Tensor:
    """min_k (z_y - z_k + kappa) / ||w_y - w_k||_dual: the distance to the nearest half-space z_k - z_y >= kappa."""
    W = model.weight.detach()
    with torch.no_grad():
        z = model(x)
    rows = []
    for i in range(len(x)):
        diffs = W[y[i]] - W
        margins = z[i, y[i]] - z[i] + kappa
        dual = diffs.norm(dim=1) if norm == "l2" else diffs.abs().sum(1)
        dist = margins / dual
        dist[y[i]] = torch.inf
        rows.append(dist.min())
    return torch.stack(rows)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_linear_classifier_reaches_the_closed_form_minimal_perturbation(order, norm, kappa):
    model = _linear()
    x = _points(12, 8)
    y = model(x).argmax(1)
    res = trust_region(model, x, y, norm=norm, order=order, confidence=kappa, bounds=(-10.0, 10.0))
    want = _closed_form_linear(model, x, y, kappa, norm)
    assert res.success.all()
    torch.testing.assert_close(res.norms, want, rtol=1e-3, atol=0)
    assert (res.margins <= -kappa).all() and (res.margins < 0).all()
    assert (res.iterations == 1).all()  # exact model: one step, then the overshoot is trimmed
    assert (res.products > 0).all() if order == 2 else (res.products == 0).all()


def test_refine_trims_the_overshoot():
    model = _linear()
    x = _points(12, 8)
    y = model(x).argmax(1)
    raw = trust_region(model, x, y, confidence=0.5, bounds=(-10.0, 10.0), refine=False)
    assert raw.success.all() and (raw.norms > 1.01 * _closed_form_linear(model, x, y, 0.5, "l2")).all()


def _binary(w: torch.Tensor, bias: float) -> nn.Module:
    """Logits (0, w.x + bias): class 0 is right while w.x + bias < 0."""
    linear = nn.Linear(len(w), 1).double()
    with torch.no_grad():
        linear.weight.copy_(w[None])
        linear.bias.fill_(bias)
    return nn.Sequential(linear, nn.ConstantPad1d((1, 0), 0.0))


def test_box_constrained_minimal_perturbations_match_scipy():
    """With pixels at 0 and 1 the box binds: compare with SLSQP (L2) and an LP (Linf) on the same problem."""
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.5], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, 0.2, 0.9, 0.5, 1.0]], dtype=torch.float64)
    model = _binary(w, -float(w @ x[0]) - 0.5)  # margin 0.5 at x; the box allows w.s up to 1.2
    y = torch.tensor([0])
    kappa = 0.25
    need = 0.5 + kappa
    lower, upper = (0.0 - x[0]).numpy(), (1.0 - x[0]).numpy()
    box = list(zip(lower, upper))
    l2 = minimize(lambda s: s @ s, np.zeros(6), jac=lambda s: 2 * s, method="SLSQP", bounds=box,
                  options={"ftol": 1e-12},
                  constraints=[{"type": "ineq", "fun": lambda s: w.numpy() @ s - need, "jac": lambda s: w.numpy()}])
    # Linf as an LP over (s, t): min t, -t <= s_i <= t, w.s >= need, box on s
    eye = np.eye(6)
    lp = linprog(np.r_[np.zeros(6), 1.0], A_ub=np.r_[np.c_[eye, -np.ones(6)], np.c_[-eye, -np.ones(6)],
                                                        [np.r_[-w.numpy(), 0.0]]],
                 b_ub=np.r_[np.zeros(12), -need], bounds=box + [(0, None)])
    assert l2.success and lp.success
    assert np.sum(np.isclose(l2.x, upper) | np.isclose(l2.x, lower)) >= 4  # the box binds
    res2 = trust_region(model, x, y, confidence=kappa)
    resinf = trust_region(model, x, y, norm="linf", confidence=kappa)
    assert res2.success.all() and resinf.success.all()
    assert float(res2.norms[0]) == pytest.approx(float(np.sqrt(l2.fun)), rel=1e-3)
    assert float(resinf.norms[0]) == pytest.approx(float(lp.fun), rel=1e-3)
    for res in (res2, resinf):
        assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1


class _QuadraticMargin(nn.Module):
    """Logits (m(x), 0) with m(x) = c + a.(x - x0) + q ||x - x0||^2 / 2: its quadratic model is exact."""

    def __init__(self, a: torch.Tensor, c: float, q: float, x0: torch.Tensor):
        super().__init__()
        self.a, self.c, self.q, self.x0 = nn.Parameter(a), c, q, x0

    def forward(self, x):
        d = x - self.x0
        m = self.c + d @ self.a + 0.5 * self.q * (d * d).sum(1)
        return torch.stack([m, torch.zeros_like(m)], 1)


@pytest.mark.parametrize("q", [0.8, -0.8])
def test_order_2_is_exact_on_a_quadratic_margin(q):
    """For isotropic curvature the best step of length rho goes along -grad: m - rho |g| + q rho^2 / 2 = -kappa."""
    a = torch.tensor([1.0, -0.5, 0.75, 0.25], dtype=torch.float64)
    x0 = torch.zeros(4, dtype=torch.float64)
    model = _QuadraticMargin(a, 1.0, q, x0)
    x = torch.tensor([[0.1, 0.2, -0.1, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    kappa = 0.1
    with torch.no_grad():
        m = float(model(x)[0, 0])
    g = float((a + q * (x[0] - x0)).norm())
    rho = (g - (g**2 - 2 * q * (m + kappa)) ** 0.5) / q
    second = trust_region(model, x, y, order=2, confidence=kappa, bounds=(-5.0, 5.0))
    first = trust_region(model, x, y, order=1, confidence=kappa, bounds=(-5.0, 5.0))
    assert second.success.all() and first.success.all()
    assert float(second.norms[0]) == pytest.approx(rho, rel=1e-3)
    assert int(second.iterations[0]) <= 2 and int(second.products[0]) > 0
    if q > 0:  # the linear model keeps undershooting a convex margin
        assert int(first.iterations[0]) > int(second.iterations[0])


def _mlp(features: int = 6, classes: int = 4, seed: int = 0) -> nn.Module:
    """A tanh MLP whose classes all meet inside the unit box (steep first layer centred on the box)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(4.0)
        model[0].bias.copy_(-0.5 * model[0].weight.sum(1))
    return model


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adversarial_examples_stay_in_bounds_and_are_what_the_result_reports(order, norm):
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, 6, generator=g, dtype=torch.float64).round()  # every pixel at a bound
    x[:, :2] = torch.rand(20, 2, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    res = trust_region(model, x, y, norm=norm, order=order, confidence=0.2, bounds=(0.0, 1.0))
    assert res.adversarial.shape == x.shape and res.adversarial.dtype == x.dtype
    assert res.adversarial.min() >= 0.0 and res.adversarial.max() <= 1.0
    with torch.no_grad():
        logits = model(res.adversarial)
    wrong = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    torch.testing.assert_close(res.margins, logits.gather(1, y[:, None])[:, 0] - wrong)
    torch.testing.assert_close(res.success, (res.margins < 0) & (res.margins <= -0.2))
    delta = (res.adversarial - x).flatten(1)
    torch.testing.assert_close(res.norms, delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1))
    assert res.success.all()


def test_each_example_stops_on_its_own():
    model = _mlp()
    x = _points(6, 6, seed=4)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[0] = logits[0].argmin()  # already misclassified by more than the confidence: nothing to do
    assert float(logits[0].max() - logits[0].min()) > 0.2
    sizes = []
    handle = model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    try:
        res = trust_region(model, x, y, confidence=0.2, bounds=(-3.0, 3.0), radius=0.05, refine=False)
    finally:
        handle.remove()
    assert bool(res.success[0]) and int(res.iterations[0]) == 0 and float(res.norms[0]) == 0
    torch.testing.assert_close(res.adversarial[0], x[0], rtol=0, atol=0)
    assert res.success.all() and len(set(res.iterations[1:].tolist())) > 1
    # one evaluation of all rows to choose targets, then one per step of the rows still active
    assert sizes[0] == 6 and sizes[1:] == [int((res.iterations > k).sum()) for k in range(int(res.iterations.max()))]
    capped = trust_region(model, x, y, confidence=0.2, bounds=(-3.0, 3.0), radius=0.05, max_iter=2)
    assert (capped.iterations[1:] == 2).all() and not capped.success[1:].any()


class _DeadUnit(nn.Module):
    """Logits (0.1, 10 relu(x_0 - 0.6)): at x_0 = 0.5 the gradient vanishes, so only a random step moves."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0, dtype=torch.float64))

    def forward(self, x):
        return torch.stack([torch.full_like(x[:, 0], 0.1), self.scale * torch.relu(x[:, 0] - 0.6)], 1)


def test_random_steps_come_from_the_seed_and_leave_the_global_rng_alone():
    model = _DeadUnit()
    x = torch.full((3, 2), 0.5, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    state = torch.get_rng_state()
    first = trust_region(model, x, y, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = trust_region(model, x, y, seed=7)
    assert first.success.all() and (first.iterations >= 2).all()
    torch.testing.assert_close(first.adversarial, again.adversarial, rtol=0, atol=0)
    assert not torch.equal(first.adversarial, trust_region(model, x, y, seed=8).adversarial)


def test_model_is_borrowed_and_restored():
    def attack(model, x, y):
        low, high = float(x.min()), float(x.max())
        for order in (1, 2):
            trust_region(model, x, y, order=order, bounds=(low, high), max_iter=3)

    assert_untouched_by(attack)


class _Square(torch.autograd.Function):
    """x^2 with a backward that reads a value (.item()), which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        assert float(grad.abs().max()) < 1e30
        return 2 * x * grad


class _Squares(nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.custom = custom
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(6, 8).double(), nn.Linear(8, 4).double()

    def forward(self, x):
        h = self.first(x)
        return self.second(_Square.apply(h) if self.custom else h * h)


def test_models_vmap_cannot_batch_take_one_backward_pass_per_candidate():
    x = _points(10, 6)
    plain = _Squares(custom=False)
    y = plain(x).argmax(1)
    want = trust_region(plain, x, y, confidence=0.1)
    got = trust_region(_Squares(custom=True), x, y, confidence=0.1)
    torch.testing.assert_close(got.adversarial, want.adversarial)
    assert got.success.all()


def test_dtype_and_device_follow_the_model():
    model = _mlp().float()
    x = _points(5, 6)
    y = model(x.float()).argmax(1)
    res = trust_region(model, x, y, confidence=0.3)
    assert res.adversarial.dtype == torch.float64 and res.success.all()
    with torch.no_grad():
        logits = model(res.adversarial.float())
    assert (logits.argmax(1) != y).all()


def test_result_repr_is_readable():
    model = _linear()
    x = _points(4, 8)
    res = trust_region(model, x, model(x).argmax(1), bounds=(-10.0, 10.0))
    assert isinstance(res, AttackResult)
    assert repr(res).startswith("AttackResult(success=4/4, median l2 norm of successes=")


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused():
    model = _linear(classes=3)
    x = _points(4, 8)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"outside bounds"):
        trust_region(model, x + 1.0, y)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        trust_region(model, x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=">= 0"):
        trust_region(model, x, torch.tensor([0, 1, -1, 0]))
    with pytest.raises(TypeError, match="integer tensor"):
        trust_region(model, x, y.double())
    with pytest.raises(TypeError, match="floating-point tensor"):
        trust_region(model, x.long(), y)
    for bad in (nn.Sequential(model, nn.Flatten(0)), nn.Sequential(model, nn.Unflatten(1, (3, 1))),
                nn.Linear(8, 1).double()):
        with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
            trust_region(bad, x, torch.zeros(4, dtype=torch.long))
    for radius in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="radius must be a positive number"):
            trust_region(model, x, y, radius=radius)
    with pytest.raises(ValueError, match="exceeds max_radius"):
        trust_region(model, x, y, radius=2.0, max_radius=1.0)
    settings = [dict(norm="l1"), dict(order=3), dict(confidence=-0.1), dict(bounds=(1.0, 0.0)), dict(max_iter=0),
                dict(candidates=0)]
    for kwargs in settings:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            trust_region(model, x, y, **kwargs)
