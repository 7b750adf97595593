"""AdaHessian and Sophia on the kernels: same trajectory as the foreach path, the documented probes, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit import kernels
from curvkit.kernels import build, reference
from curvkit.optim import AdaHessian, Sophia

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _conv_model(dtype, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _run_twins(make_opt, dtype, steps=20, gnb=False):
    """The same model trained by the fused and the foreach path; returns both parameter vectors."""
    model, x, y = _conv_model(dtype)
    out = []
    for fused in (True, False):
        twin = copy.deepcopy(model)
        opt = make_opt(twin.parameters(), fused)

        def closure():
            logits = twin(x)
            loss = F.cross_entropy(logits, y)
            return (loss, logits) if gnb else loss

        for _ in range(steps):
            opt.step(closure)
        out.append(_flat(twin))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(n_samples=2, update_each=3, weight_decay=0.01, hessian_power=0.5),
    dict(spatial_average=False, betas=(0.6, 0.9)),
])
def test_adahessian_fused_and_foreach_paths_agree_after_20_steps(dtype, kwargs):
    fused, foreach = _run_twins(lambda p, f: AdaHessian(p, lr=0.05, seed=3, fused=f, **kwargs), dtype)
    assert (fused - foreach).abs().max() <= 1e-5 * foreach.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["hutchinson", "gnb"])
def test_sophia_fused_and_foreach_paths_agree_after_20_steps(dtype, estimator):
    fused, foreach = _run_twins(
        lambda p, f: Sophia(p, lr=0.01, update_each=2, estimator=estimator, seed=4, fused=f), dtype,
        gnb=estimator == "gnb")
    assert (fused - foreach).abs().max() <= 1e-5 * foreach.abs().max()


def test_fused_none_runs_the_kernels_and_false_the_reference(monkeypatch):
    calls = []
    real = reference.adahessian_step_
    monkeypatch.setattr(reference, "adahessian_step_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    model, x, y = _conv_model(torch.float32)
    for fused, expected in [(None, []), (True, []), (False, [1])]:
        calls.clear()
        AdaHessian(model.parameters(), seed=0, fused=fused).step(lambda: F.cross_entropy(model(x), y))
        assert calls == expected, fused


@pytest.mark.parametrize("fused", [True, False])
def test_probes_are_philox_keyed_by_the_seed_and_a_draw_counter(fused):
    """On f = 1/2 theta^T A theta the first curvature estimate is D = z * (A z), z = Philox(seed, draw 0)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    a = a @ a.T
    theta = torch.zeros(6, requires_grad=True)
    opt = AdaHessian([theta], betas=(0.9, 0.5), seed=1234, fused=fused)
    opt.step(lambda: 0.5 * theta @ a @ theta)
    z = reference.rademacher_flat(6, 1234, 0, theta.dtype)
    d = z * (a @ z)
    torch.testing.assert_close(opt.state[theta]["exp_hessian_diag_sq"], 0.5 * d * d)
    assert opt.state_dict()["curvkit"]["probe_offset"] == 1


def test_resume_is_bit_exact_on_the_kernels():
    model, x, y = _conv_model(torch.float32)
    opt = AdaHessian(model.parameters(), lr=0.05, n_samples=2, update_each=2, seed=8, fused=True)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.step(lambda: F.cross_entropy(model(x), y))

    resumed = _conv_model(torch.float32)[0]
    resumed.load_state_dict(saved_model)
    opt2 = AdaHessian(resumed.parameters(), lr=0.05, n_samples=2, update_each=2, seed=999, fused=True)
    opt2.load_state_dict(saved_opt)
    for _ in range(4):
        opt2.step(lambda: F.cross_entropy(resumed(x), y))
    assert torch.equal(_flat(model), _flat(resumed))


def test_fused_true_explains_when_the_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {"cpu": False, "cuda": False})
    monkeypatch.setattr(build, "_errors", {"cpu": "RuntimeError: no compiler"})
    with pytest.raises(RuntimeError, match="fused=True needs curvkit's compiled kernels.*no compiler"):
        AdaHessian(nn.Linear(2, 2).parameters(), fused=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        Sophia(nn.Linear(2, 2).parameters(), fused=True)
    with pytest.raises(RuntimeError, match="no kernels for meta tensors"):
        kernels.use_kernels("meta", fused=True)
    AdaHessian(nn.Linear(2, 2).parameters(), fused=None)  # falls back quietly


def test_strided_gradients_run_on_the_kernels():
    """Autograd returns a non-contiguous Hessian-vector product for this conv stack; the kernels still take it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    twin = copy.deepcopy(model)
    fused = AdaHessian(model.parameters(), seed=0, fused=True)
    foreach = AdaHessian(twin.parameters(), seed=0, fused=False)
    for _ in range(5):
        fused.step(lambda: F.cross_entropy(model(x), y))
        foreach.step(lambda: F.cross_entropy(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ggn_cross_entropy_products_run_on_the_kernel(monkeypatch):
    from curvkit.hessian import GGNOperator

    def refuse(*args):
        raise AssertionError("the reference ran instead of the kernel")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    G = GGNOperator(model, F.cross_entropy, (x, y))
    v = torch.randn(G.shape[0])
    expected = G @ v
    monkeypatch.setattr(reference, "softmax_ce_hessian_product", refuse)
    torch.testing.assert_close(GGNOperator(model, F.cross_entropy, (x, y)) @ v, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_update_can_write_the_next_draw_into_its_own_probes(dtype):
    shapes = [(4, 3, 3), (7,), (130,)]
    g = torch.Generator().manual_seed(0)
    state = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(5)]
    state[3] = [t.abs() for t in state[3]]
    probes = reference.rademacher(state[0], 9, 4)
    ours, ref = [[t.clone() for t in ts] for ts in state], [[t.clone() for t in ts] for ts in state]
    ours_probes, ref_probes = [z.clone() for z in probes], [z.clone() for z in probes]
    args = (0.1, 0.9, 0.999, 1e-4, 0.0, 1.0, [0.1] * 3, [0.01] * 3)
    kernels.adahessian_step_(*ours, *args, probes=ours_probes, windows=[9, 1, 1], next_probes=ours_probes,
                             probe_seed=9, next_offset=5, fused=True)
    reference.adahessian_step_(*ref, *args, probes=ref_probes, windows=[9, 1, 1])
    for mine, theirs in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)   # the update read the probes before the draw
    for z, expected in zip(ours_probes, reference.rademacher(state[0], 9, 5)):
        assert torch.equal(z, expected)


@pytest.mark.parametrize("make", [
    lambda p: AdaHessian(p, lr=0.05, seed=1),
    lambda p: AdaHessian(p, lr=0.05, seed=1, update_each=3, n_samples=2),
    lambda p: Sophia(p, lr=0.01, seed=1, update_each=2),
])
def test_draws_made_in_advance_are_the_draws_made_on_time(make):
    """One group (the update writes the next draw in advance) against two groups (every draw made on time)."""
    model, x, y = _conv_model(torch.float64)
    twin = copy.deepcopy(model)
    one = make(model.parameters())
    two = make([{"params": list(twin.parameters())[:2]}, {"params": list(twin.parameters())[2:]}])
    for _ in range(7):
        one.step(lambda: F.cross_entropy(model(x), y))
        two.step(lambda: F.cross_entropy(twin(x), y))
    assert torch.equal(_flat(model), _flat(twin))
