"""prune_weights: a pruned copy with torch.nn.utils.prune masks, exact counts, N:M layout, the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from curvkit.compress import magnitude_masks, nm_masks, prune_weights
from tests._models import assert_untouched_by, make_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 16), nn.Tanh(), nn.Linear(16, 3))


WEIGHTS = ["0.weight", "3.weight", "5.weight", "7.weight"]


def _weights(model: nn.Module, names=WEIGHTS) -> list[torch.Tensor]:
    return [model.get_parameter(n).detach() for n in names]


def test_the_model_is_never_changed():
    assert_untouched_by(lambda model, x, y: prune_weights(model, 0.5))
    assert_untouched_by(lambda model, x, y: prune_weights(model, pattern="layer"))


def test_global_pruning_masks_the_copy_with_torch_prune():
    model = _net()
    pruned = prune_weights(model, 0.8)
    expected = magnitude_masks(_weights(model), 0.8)
    n = sum(w.numel() for w in _weights(model))
    zeros = 0
    for name, mask in zip(WEIGHTS, expected):
        module = pruned.get_submodule(name.rpartition(".")[0])
        assert prune.is_pruned(module)
        assert torch.equal(module.weight_mask, mask.to(module.weight.dtype))
        assert torch.equal(module.weight_orig, model.get_parameter(name))
        zeros += int((module.weight == 0).sum())
    assert zeros == round(0.8 * n)
    assert not any(prune.is_pruned(m) for m in model.modules())
    x = torch.randn(5, 1, 6, 6)
    masked = _net()
    with torch.no_grad():
        for name, mask in zip(WEIGHTS, expected):
            masked.get_parameter(name).mul_(mask)
    torch.testing.assert_close(pruned.eval()(x), masked.eval()(x), rtol=0, atol=0)


def test_layer_pruning_prunes_every_weight_by_the_same_fraction():
    model = _net()
    pruned = prune_weights(model, 0.6, "layer")
    for name, w in zip(WEIGHTS, _weights(model)):
        module = pruned.get_submodule(name.rpartition(".")[0])
        assert int((module.weight_mask == 0).sum()) == round(0.6 * w.numel())


def test_nm_pruning_follows_the_input_dimension_and_exclude_leaves_a_layer_dense():
    model = _net()
    with pytest.raises(ValueError, match=r"0\.weight has shape \(8, 1, 3, 3\).*list it in exclude="):
        prune_weights(model, pattern="4:8")
    pruned = prune_weights(model, pattern="4:8", exclude={"0.weight"})
    assert not prune.is_pruned(pruned[0]) and torch.equal(pruned[0].weight, model[0].weight)
    for name, mask in zip(WEIGHTS[1:], nm_masks(_weights(model, WEIGHTS[1:]), "4:8")):
        assert torch.equal(pruned.get_submodule(name.rpartition(".")[0]).weight_mask, mask.to(torch.float64))
    two_four = prune_weights(model, 0.5, "2:4", exclude={"0.weight"})  # amount 1 - N/M is accepted
    assert torch.equal(two_four[5].weight_mask, nm_masks([model[5].weight], "2:4")[0].to(torch.float64))


def test_a_pruned_model_is_pruned_again_from_its_masked_weights():
    model = _net()
    once = prune_weights(model, 0.5)
    twice = prune_weights(once, 0.8)
    for name in WEIGHTS:
        first, second = (m.get_submodule(name.rpartition(".")[0]).weight_mask for m in (once, twice))
        assert torch.all(second <= first)  # what the first pruning removed stays removed
    zeros = sum(int((twice.get_submodule(n.rpartition(".")[0]).weight == 0).sum()) for n in WEIGHTS)
    assert zeros == round(0.8 * sum(w.numel() for w in _weights(model)))
    assert prune.is_pruned(once[0]) and int((once[0].weight_mask == 0).sum()) < int((twice[0].weight_mask == 0).sum())


def test_bad_arguments_say_what_to_do():
    model, _, _ = make_model("tanh_mlp")
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)"):
        prune_weights(model, 1.0)
    with pytest.raises(ValueError, match="pattern must be 'global', 'layer' or 'N:M'"):
        prune_weights(model, pattern="topk")
    with pytest.raises(ValueError, match="prunes a fraction 0.5 of the weights; leave amount unset"):
        prune_weights(model, 0.9, pattern="2:4")
    with pytest.raises(ValueError, match=r"not weights of the model; its weights are \['0.weight', '2.weight'\]"):
        prune_weights(model, exclude={"0.bias"})
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_weights(model, exclude={"0.weight", "2.weight"})
