"""Edge-of-stability physics on a digits MLP: GD hovers at 2/lr, Adam's preconditioned sharpness at 38/lr."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.analysis import SharpnessTracker, eigen_direction, stability
from curvkit.datasets import load_digits_tensors
from curvkit.hessian import GGNOperator, HessianOperator, PreconditionedOperator, eigenvalues
from curvkit.optim import Sophia


def _setup():
    (X, y), _ = load_digits_tensors()
    X, Y = X[:500].float(), F.one_hot(y[:500], 10).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).float()
    return model, X, Y


def _train(model, opt, X, Y, steps, tracker):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(X), Y).backward()
        opt.step()
        tracker.step()
    return tracker.history


def test_gradient_descent_sharpens_then_hovers_at_two_over_lr(tmp_path):
    model, X, Y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    tracker = SharpnessTracker(model, F.mse_loss, (X, Y), optimizer=opt, every=25)
    df = _train(model, opt, X, Y, 1500, tracker)
    assert (df["threshold"] == 1.0).all()
    assert df["sharpness"].iloc[0] < 0.6  # starts well below 2/lr ...
    late = df[df["step"] >= 500]["sharpness"]
    assert late.between(0.8, 1.2).all(), late.describe()  # ... and hovers within 20% of it
    assert df["preconditioned_sharpness"].isna().all()
    tracker.plot().savefig(tmp_path / "gd.png")
    assert 0 < tracker.overhead < 1


def test_adam_preconditioned_sharpness_hovers_at_38_over_lr_while_raw_stays_low():
    model, X, Y = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = SharpnessTracker(model, F.mse_loss, (X, Y), optimizer=opt, every=50)
    df = _train(model, opt, X, Y, 1200, tracker)
    assert df["threshold"].iloc[-1] == pytest.approx(38 / 1e-2)
    late = df[df["step"] >= 450]
    assert late["preconditioned_sharpness"].between(0.8 * 3800, 1.2 * 3800).all(), late
    assert (late["sharpness"] < 0.05 * 2 / 1e-2).all()


def test_measurements_match_a_cold_eigensolver_and_thresholds_for_momentum():
    model, X, Y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    tracker = SharpnessTracker(model, F.mse_loss, (X, Y), optimizer=opt, every=1, tol=1e-8)
    _train(model, opt, X, Y, 3, tracker)
    cold = eigenvalues(HessianOperator(model, F.mse_loss, (X, Y)), k=1, seed=5).values[0]
    row = tracker.history.iloc[-1]
    assert row["sharpness"] == pytest.approx(float(cold), rel=1e-5)
    assert row["threshold"] == pytest.approx(3.8 / (2.8 * 0.1))
    assert row["loss"] == pytest.approx(float(F.mse_loss(model(X), Y)), rel=1e-6)
    assert np.isfinite(tracker.history["seconds"]).all()


def test_bad_every_is_refused():
    model, X, Y = _setup()
    with pytest.raises(ValueError, match="every"):
        SharpnessTracker(model, F.mse_loss, (X, Y), every=0)


def test_ggn_sharpness_and_curvkit_optimizers_say_their_own_threshold():
    model, X, Y = _setup()
    X, Y = X[:100].double(), Y[:100].double()
    model = model.double()
    opt = Sophia(model.parameters(), lr=1e-3, update_each=1, seed=0)
    tracker = SharpnessTracker(model, F.mse_loss, (X, Y), optimizer=opt, every=1, tol=1e-8, operator="ggn")
    for _ in range(2):
        opt.step(lambda: F.mse_loss(model(X), Y))
        tracker.step()
    row = tracker.history.iloc[-1]
    G = GGNOperator(model, F.mse_loss, (X, Y))
    assert row["sharpness"] == pytest.approx(float(eigenvalues(G, k=1, seed=1, tol=1e-10).values[0]), rel=1e-6)
    assert row["threshold"] == pytest.approx(opt.stability_threshold())
    P = opt.preconditioner()
    pre = eigenvalues(PreconditionedOperator(G, P), k=1, seed=1, tol=1e-10).values[0]
    assert row["preconditioned_sharpness"] == pytest.approx(float(pre), rel=1e-6)
    assert row["loss"] == pytest.approx(float(F.mse_loss(model(X), Y)), rel=1e-12)
    assert G.loss() == pytest.approx(row["loss"], rel=1e-12)
    d = eigen_direction(model, F.mse_loss, (X, Y), operator="ggn", seed=0)[0]
    v = torch.cat([d[n].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close((G @ v).norm(), torch.tensor(row["sharpness"], dtype=v.dtype), rtol=1e-5, atol=0)


def test_the_threshold_at_learning_rate_zero_is_infinite():
    model, X, Y = _setup()                           # schedules that decay to zero end there
    H = HessianOperator(model, F.mse_loss, (X, Y))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), torch.optim.Adam(model.parameters(), lr=0.0),
                torch.optim.RMSprop(model.parameters(), lr=0.0), Sophia(model.parameters(), lr=0.0)):
        assert stability(opt, H)[0] == float("inf")
