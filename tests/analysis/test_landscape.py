"""Directions and landscapes: Li et al.'s normalisation, absolute coordinates, model untouched."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvkit.analysis import direction_to, eigen_direction, landscape_1d, landscape_2d, random_direction
from curvkit.hessian import HessianOperator, eigenvalues
from tests._models import dict_twins, hessian_case, loss_of_dict_batch


def _loss_at(model, data, directions, coeffs):
    params = {n: p.detach() + sum(c * d[n] for c, d in zip(coeffs, directions)) for n, p in model.named_parameters()}
    x, y = data
    return float(F.cross_entropy(functional_call(model, params, (x,)), y))


def test_filter_normalisation_matches_filter_norms_and_zeroes_biases():
    model, _, _ = hessian_case("conv_bn")
    d = random_direction(model, seed=0)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert d[name].abs().max() == 0, name
        else:
            dims = tuple(range(1, p.dim()))
            norm_of = torch.linalg.vector_norm
            torch.testing.assert_close(norm_of(d[name], dim=dims), norm_of(p.detach(), dim=dims), rtol=1e-8, atol=1e-8)
    kept = random_direction(model, seed=0, ignore=None)
    torch.testing.assert_close(kept["4.bias"], model[4].bias.detach())
    layer = random_direction(model, seed=0, norm="layer")
    torch.testing.assert_close(layer["4.weight"].norm(), model[4].weight.detach().norm())


def test_directions_are_reproducible_and_seed_dependent():
    model, _, _ = hessian_case("tanh_mlp")
    a, b, c = random_direction(model, seed=3), random_direction(model, seed=3), random_direction(model, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    with pytest.raises(ValueError, match="norm"):
        random_direction(model, norm="global")


def test_landscape_centre_and_off_centre_points_are_exact_and_model_untouched():
    model, data, _ = hessian_case("conv_bn")
    before = copy.deepcopy(model.state_dict())
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    ls = landscape_2d(model, F.cross_entropy, data, d1, d2, span=(-1, 1), steps=5, progress=False)
    assert ls.loss.shape == (5, 5)
    assert ls.loss[2, 2] == pytest.approx(_loss_at(model, data, [], []), rel=1e-10)
    assert ls.loss[0, 3] == pytest.approx(_loss_at(model, data, [d1, d2], [ls.x[0], ls.y[3]]), rel=1e-10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dataset_average_and_one_point_per_call_agree():
    model, (x, y), _ = hessian_case("tanh_mlp")
    d = random_direction(model, seed=0)
    whole = landscape_1d(model, F.cross_entropy, (x, y), d, steps=7, progress=False)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    split = landscape_1d(model, F.cross_entropy, batches, d, steps=7, points_per_call=1, progress=False)
    np.testing.assert_allclose(whole.loss, split.loss, rtol=1e-10)


def test_eigen_directions_are_unit_hessian_eigenvectors():
    model, data, D = hessian_case("gelu_mlp")
    d1, d2 = eigen_direction(model, F.cross_entropy, data, k=2)
    H = HessianOperator(model, F.cross_entropy, data)
    v1 = H.flatten([d1[n] for n in H.param_names])
    top = eigenvalues(H, k=2, seed=0).values
    torch.testing.assert_close(v1.norm(), torch.tensor(1.0, dtype=v1.dtype))
    torch.testing.assert_close(D @ v1, top[0] * v1, rtol=0, atol=1e-5)
    assert abs(float(v1 @ H.flatten([d2[n] for n in H.param_names]))) < 1e-6


def test_interpolation_between_two_weight_sets():
    model, data, _ = hessian_case("tanh_mlp")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    line = landscape_1d(model, F.cross_entropy, data, direction_to(model, other.state_dict()), span=(0, 1), steps=3,
                        progress=False)
    x, y = data
    assert line.loss[-1] == pytest.approx(float(F.cross_entropy(other(x), y)), rel=1e-10)
    assert line.loss[0] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-10)


def test_forward_hook_takes_dict_batches():
    net, pairs, wrapped, dicts = dict_twins()
    d1, d2 = random_direction(net, seed=0), random_direction(net, seed=1)
    want = landscape_2d(net, F.cross_entropy, pairs, d1, d2, steps=3, progress=False)
    d1, d2 = ({"net." + n: t for n, t in d.items()} for d in (d1, d2))
    got = landscape_2d(wrapped, None, dicts, d1, d2, steps=3, forward=loss_of_dict_batch, progress=False)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12)
    x, y = (torch.cat(t) for t in zip(*pairs))
    with torch.no_grad():
        assert got.loss[1, 1] == pytest.approx(float(F.cross_entropy(net(x), y)), rel=1e-12)


@pytest.mark.parametrize("kind", ["contour", "surface", "heatmap"])
def test_figures_are_written(tmp_path, kind):
    model, data, _ = hessian_case("tanh_mlp")
    ls = landscape_2d(model, F.cross_entropy, data, random_direction(model, seed=0), random_direction(model, seed=1),
                      steps=4, progress=False)
    ls.plot(kind=kind, log=kind != "surface").savefig(tmp_path / f"{kind}.png")
    assert (tmp_path / f"{kind}.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="steps"):
        landscape_2d(model, F.cross_entropy, data, random_direction(model), random_direction(model), steps=1)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 2))
    d = {n: torch.ones(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'0.weight' is on the meta device.*to_empty"):
        landscape_1d(model, F.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), d, steps=3)
