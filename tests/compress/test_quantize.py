"""Quantizer and HAWQ-v3 integer program: exact against brute force, budgets and ties respected."""

from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from curvkit.compress import mixed_precision, perturbation, quantize, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_channels_have_at_most_2_to_the_b_levels(bits):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(bits))
    q = quantize_weight(w, bits)
    for c in range(6):
        assert len(torch.unique(q[c])) <= 2**bits - 1
        scale = w[c].abs().max() / (2 ** (bits - 1) - 1)
        assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6  # round to nearest
        torch.testing.assert_close(q[c].abs().max(), w[c].abs().max())  # symmetric grid reaches max|w_c|
    assert torch.equal(quantize_weight(torch.zeros(2, 3), bits), torch.zeros(2, 3))


def test_quantize_returns_a_copy():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model, {"0": 2})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(torch.unique(q[0].weight[0])) <= 3 and torch.equal(q[2].weight, model[2].weight)
    with pytest.raises(ValueError, match="not Linear/Conv"):
        quantize(model, {"1": 4})


def _instance(seed, scale=10.0, signed=False, size_scale=1):
    """A model and a layer sensitivity table with mean_eig of order ``scale`` (of both signs if ``signed``)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    names = ["0", "2", "4", "6"]
    sizes = np.array([m.weight.numel() for m in model if isinstance(m, nn.Linear)]) * size_scale
    eig = torch.randn(4, generator=g) if signed else torch.rand(4, generator=g)
    sens = pd.DataFrame({"module": names, "n_params": sizes, "mean_eig": eig.double().numpy() * scale,
                         "macs": sizes.astype(float) * 3})
    return model, sens


def _brute_force(model, sens, bits, max_weight_bits=None, max_bops=None, ties=(), activation_bits=8):
    """The minimum objective over every assignment that meets the budgets and ties, by enumeration."""
    pert = perturbation(model, bits).loc[list(sens["module"])].to_numpy()
    omega = sens["mean_eig"].to_numpy()[:, None] * pert
    n, macs = sens["n_params"].to_numpy(), sens["macs"].to_numpy()
    choices = np.array(list(itertools.product(range(len(bits)), repeat=len(sens))))
    chosen = np.array(bits)[choices]
    feasible = np.ones(len(choices), dtype=bool)
    if max_weight_bits is not None:
        feasible &= (chosen * n).sum(1) <= max_weight_bits
    if max_bops is not None:
        feasible &= (chosen * macs * activation_bits).sum(1) <= max_bops
    for group in ties:
        feasible &= (choices[:, group] == choices[:, group[:1]]).all(1)
    values = omega[np.arange(len(sens)), choices].sum(1)
    return values[feasible].min()


@pytest.mark.parametrize("scale, signed, size_scale", [
    (10.0, False, 1),
    (1e-9, False, 1),
    (4e-5, True, 1),  # a small BERT's table: tiny mean eigenvalues, some negative
    (1e9, True, 1),
    (1e-9, True, 10**7),  # tiny objective, huge budgets
], ids=["unit", "tiny", "tiny_signed", "huge_signed", "tiny_with_huge_budgets"])
@pytest.mark.parametrize("seed", range(3))
def test_ilp_equals_brute_force_with_budgets_and_ties(seed, scale, signed, size_scale):
    model, sens = _instance(seed, scale, signed, size_scale)
    bits = (2, 3, 4, 8)
    n, bops = sens["n_params"].sum(), 8 * sens["macs"].sum()
    cases = [dict(max_weight_bits=3.5 * n), dict(max_bops=4 * bops), dict(max_weight_bits=5 * n, ties=[["0", "4"]]),
             dict(max_weight_bits=4 * n, max_bops=3 * bops, ties=[["2", "4", "6"]]), dict()]
    for case in cases:
        ties = case.pop("ties", None)
        res = mixed_precision(model, sens, bits, ties=ties, **case)
        tie_idx = [[list(sens["module"]).index(m) for m in g] for g in (ties or [])]
        best = _brute_force(model, sens, bits, ties=tie_idx, **case)
        assert res.objective == pytest.approx(best, rel=1e-9, abs=0), (case, res)
        if "max_weight_bits" in case:
            assert res.weight_bits <= case["max_weight_bits"]
        if "max_bops" in case:
            assert res.bops <= case["max_bops"]
        for group in ties or []:
            assert len({res.bits[m] for m in group}) == 1


def test_infeasible_budgets_and_bad_input_raise():
    model, sens = _instance(0)
    with pytest.raises(ValueError, match="smallest possible weight size"):
        mixed_precision(model, sens, (4, 8), max_weight_bits=3 * sens["n_params"].sum())
    with pytest.raises(ValueError, match="bits must be integers"):
        mixed_precision(model, sens, (1, 4))
    with pytest.raises(ValueError, match="max_weight_bits must be positive"):
        mixed_precision(model, sens, max_weight_bits=-5)
    with pytest.raises(ValueError, match="ties name modules"):
        mixed_precision(model, sens, ties=[["0", "nope"]])
    with pytest.raises(ValueError, match="macs"):
        mixed_precision(model, sens.drop(columns="macs"), max_bops=1e6)


def test_solver_results_are_verified(monkeypatch):
    model, sens = _instance(0)
    solver = importlib.import_module("curvkit.compress.quantize")
    all_eight_bits = SimpleNamespace(status=0, x=np.tile([0.0, 0.0, 0.0, 1.0], 4), message="Optimal")
    monkeypatch.setattr(solver, "milp", lambda *args, **kwargs: all_eight_bits)
    with pytest.raises(RuntimeError, match="exceeds max_weight_bits"):
        mixed_precision(model, sens, (2, 3, 4, 8), max_weight_bits=3 * sens["n_params"].sum())
    stopped = SimpleNamespace(status=1, x=None, message="Time limit reached")
    monkeypatch.setattr(solver, "milp", lambda *args, **kwargs: stopped)
    with pytest.raises(RuntimeError, match="did not solve: Time limit reached"):
        mixed_precision(model, sens, (2, 3, 4, 8))


def test_frontier_is_monotone_and_plots(tmp_path):
    model, sens = _instance(1)
    res = mixed_precision(model, sens, (2, 4, 8), frontier=7)
    front = res.frontier
    assert len(front) == 7 and (np.diff(front["objective"]) <= 1e-12).all()
    assert (front["weight_bits"] <= front["budget"] + 1e-9).all()
    res.plot_frontier().savefig(tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 5000
