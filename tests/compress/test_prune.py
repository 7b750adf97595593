"""Channel sensitivity and pruning: exact channel traces, importance vs true damage, masks on a copy."""

from __future__ import annotations

import copy
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from curvkit.compress import (
    channel_scores,
    mixed_precision,
    prune_channels,
    quantize,
    recalibrate_bn,
    remove_channels,
    sensitivity,
)
from curvkit.datasets import load_digits_tensors
from curvkit.hessian import GGNOperator
from tests._models import dense_ggn, dense_hessian, dict_twins, hessian_case, loss_of_dict_batch, make_model


@functools.cache
def _trained(kind: str):
    """A digits model trained with Adam (float32), its scoring batch and the test split."""
    (X, y), (Xt, yt) = load_digits_tensors()
    X, Xt = X.float(), Xt.float()
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    else:
        model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 32),
                              nn.Tanh(), nn.Linear(32, 10))
    model = model.float()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for epoch in range(12):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), (X[:512], y[:512]), (Xt, yt)


def _accuracy(model, data):
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def test_channel_traces_match_exact_blocks_in_rank():
    model, data, D = hessian_case("conv_bn")
    sens = sensitivity(model, F.cross_entropy, data, granularity="channel", rtol=0.01, max_matvecs=3000, seed=0,
                       progress=False)
    exact = []
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    for module, c in zip(sens["module"], sens["channel"]):
        w, b = names.index(f"{module}.weight"), names.index(f"{module}.bias")
        per = getattr(model, module).weight[0].numel()
        idx = torch.cat([torch.arange(offsets[w] + c * per, offsets[w] + (c + 1) * per),
                         torch.tensor([offsets[b] + c])])
        exact.append(float(D[idx][:, idx].trace()))
    assert spearmanr(sens["trace"], exact).statistic >= 0.9
    assert sens.attrs["skipped"] == ["1 (BatchNorm2d): not a Linear/Conv layer, skipped"]
    np.testing.assert_allclose(sens["hap"], sens["trace"] / sens["n_params"] * sens["weight_sq"])


@pytest.mark.parametrize("operator, dense", [("hessian", dense_hessian), ("ggn", dense_ggn), (GGNOperator, dense_ggn)],
                         ids=["hessian", "ggn", "factory"])
def test_quadratic_scores_are_exact_for_the_chosen_operator(operator, dense):
    model, x, y = make_model("conv_bn")
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]
    scores = channel_scores(model, F.cross_entropy, loader, method="quadratic", operator=operator, max_block=4)
    D = dense(model, F.cross_entropy, loader)
    names = [n for n, _ in model.named_parameters()]
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    exact = []
    for module, c in zip(scores["module"], scores["channel"]):
        w, b = names.index(f"{module}.weight"), names.index(f"{module}.bias")
        per = model.get_submodule(module).weight[0].numel()
        idx = torch.cat([torch.arange(offsets[w] + c * per, offsets[w] + (c + 1) * per),
                         torch.tensor([offsets[b] + c])])
        w_c = theta[idx]
        exact.append(float(w_c @ D[idx][:, idx] @ w_c))
    assert len(exact) == 3 + 3
    np.testing.assert_allclose(scores["score"], exact, rtol=1e-9)


def _single_channel_damage(model, data, layer):
    base = float(F.cross_entropy(model(data[0]), data[1]))
    damage = []
    for c in range(model.get_submodule(layer).weight.shape[0]):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            probe.get_submodule(layer).weight[c] = 0
            probe.get_submodule(layer).bias[c] = 0
            damage.append(float(F.cross_entropy(probe(data[0]), data[1])) - base)
    return damage


def test_hessian_importance_predicts_single_channel_damage_better_than_l2():
    model, data, _ = _trained("mlp")
    scores = {m: channel_scores(model, F.cross_entropy, data, m, max_matvecs=1000, progress=False)
              for m in ("hessian", "quadratic", "l2")}
    rho = {m: [] for m in scores}
    for layer in ("0", "2"):
        damage = _single_channel_damage(model, data, layer)
        for m, df in scores.items():
            rho[m].append(spearmanr(df[df["module"] == layer]["score"], damage).statistic)
    assert np.mean(rho["hessian"]) > np.mean(rho["l2"]), rho
    assert min(rho["quadratic"]) > 0.85 and min(rho["quadratic"]) > max(rho["l2"]), rho


@pytest.mark.parametrize("method", ["hessian", "quadratic", "l2", "l1"])
def test_pruning_respects_amount_caps_and_classifier_and_leaves_the_model(method):
    model, data, test = _trained("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_channels(model, F.cross_entropy, data, amount=0.4, method=method, max_per_layer=0.75,
                            max_matvecs=300, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    table = pruned.pruning_table
    prunable = table[table["module"] != "9"]
    assert table[table["module"] == "9"]["pruned"].sum() == 0
    assert prunable["pruned"].sum() == round(0.4 * len(prunable))
    for _, group in prunable.groupby("module"):
        assert group["pruned"].sum() <= 0.75 * len(group)
    for name, group in prunable[prunable["pruned"]].groupby("module"):
        layer = pruned.get_submodule(name)
        assert hasattr(layer, "weight_mask") and hasattr(layer, "bias_mask")
        with torch.no_grad():
            assert layer.weight[group["channel"].tolist()].abs().sum() == 0
            if name == "1":  # the BatchNorm after the first conv is masked with it
                assert pruned[2].weight[group["channel"].tolist()].abs().sum() == 0
    smaller = remove_channels(pruned)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(smaller(test[0]), pruned(test[0]), rtol=1e-4, atol=1e-5)


def test_implants_start_as_the_identity_and_bn_recalibration_returns_a_copy():
    model, data, test = _trained("cnn")
    pruned = prune_channels(model, F.cross_entropy, data, amount=0.3, method="l2")
    implanted = prune_channels(model, F.cross_entropy, data, amount=0.3, method="l2", implant=True)
    with torch.no_grad():
        torch.testing.assert_close(implanted(test[0]), pruned(test[0]))
    assert any(type(m).__name__ == "Implanted" for m in implanted.modules())
    recal = recalibrate_bn(pruned, [data])
    assert not torch.equal(recal[2].running_mean, pruned[2].running_mean)
    assert _accuracy(recal, test) > 0.5


def test_mixed_precision_beats_uniform_4_bit_at_the_same_size():
    model, data, test = _trained("cnn")
    sens = sensitivity(model, F.cross_entropy, data, "layer", max_matvecs=300, progress=False)
    n = sens["n_params"].sum()
    res = mixed_precision(model, sens, bits=(2, 3, 4, 5, 6, 8), max_weight_bits=4 * n)
    uniform = {m: 4 for m in sens["module"]}
    loss = {name: float(F.cross_entropy(quantize(model, bits)(test[0]), test[1]))
            for name, bits in (("mixed", res.bits), ("uniform", uniform))}
    assert res.weight_bits <= 4 * n
    assert loss["mixed"] < loss["uniform"], (loss, res.bits)
    assert _accuracy(quantize(model, res.bits), test) >= _accuracy(quantize(model, uniform), test)


@pytest.mark.parametrize("method", ["hessian", "quadratic", "l2"])
def test_scores_and_pruning_take_the_forward_hook(method):
    net, pairs, wrapped, dicts = dict_twins()
    kwargs = dict(method=method, max_matvecs=60, progress=False) if method != "l2" else dict(method=method)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "layerwise", RuntimeWarning)
        want = channel_scores(net, F.cross_entropy, pairs, **kwargs)
        got = channel_scores(wrapped, None, dicts, forward=loss_of_dict_batch, **kwargs)
        pruned = prune_channels(wrapped, None, dicts, amount=0.4, forward=loss_of_dict_batch, **kwargs)
    assert list(got["module"]) == ["net." + m for m in want["module"]]
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-10)
    table = pruned.pruning_table
    assert table[table["module"] == "net.5"]["pruned"].sum() == 0 and table["pruned"].sum() == round(0.4 * 10)


def test_bn_recalibration_takes_the_forward_hook():
    net, pairs, wrapped, dicts = dict_twins()
    want = recalibrate_bn(net, pairs)
    got = recalibrate_bn(wrapped, dicts, forward=lambda model, batch: model(**batch))
    torch.testing.assert_close(got.net[1].running_mean, want[1].running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.net[1].running_var, want[1].running_var, rtol=1e-12, atol=0)
    with torch.no_grad():  # momentum None: the running mean is the mean of the batch means
        torch.testing.assert_close(want[1].running_mean, torch.stack([net[0](b[0]).mean(0) for b in pairs]).mean(0))
    assert not torch.equal(want[1].running_mean, net[1].running_mean)


def test_bad_pruning_arguments():
    model, data, _ = _trained("mlp")
    with pytest.raises(ValueError, match="amount"):
        prune_channels(model, F.cross_entropy, data, amount=1.0, method="l2")
    with pytest.raises(ValueError, match="method"):
        prune_channels(model, F.cross_entropy, data, method="random")
    with pytest.raises(ValueError, match="classifier"):
        prune_channels(model, F.cross_entropy, data, method="l2", classifier="1")
    with pytest.raises(TypeError, match="Sequential"):
        remove_channels(nn.Linear(2, 2).__class__.__mro__[0](2, 2))


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    for call in (lambda: sensitivity(model, F.cross_entropy, data),
                 lambda: channel_scores(model, F.cross_entropy, data, method="l2"),
                 lambda: quantize(model, {"0": 4})):
        with pytest.raises(ValueError, match="'0.weight' is on the meta device.*to_empty"):
            call()
