"""GGNOperator against dense J^T H_out J in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.hessian import GGNOperator, HessianOperator, eigenvalues
from tests._models import MODEL_KINDS, dense_ggn, dense_hessian, make_model, token_bag_twins


def _check(G, D):
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(G @ V, D @ V, rtol=1e-10, atol=1e-12)


def _regression(seed=0, out=2):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, out)).double()
    return model, torch.randn(10, 3, generator=g), torch.randn(10, out, generator=g)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_cross_entropy_matches_dense_ggn(kind):
    model, x, y = make_model(kind)
    G = GGNOperator(model, F.cross_entropy, (x, y))
    _check(G, dense_ggn(model, F.cross_entropy, [(x, y)]))
    assert G.matvecs == 3


@pytest.mark.parametrize("loss_fn", [
    nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
    nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0])),  # weighted: no closed form
    lambda out, t: F.cross_entropy(out, t),  # unrecognised: double backward of the loss
], ids=["sum_smoothed", "weighted", "wrapped"])
def test_cross_entropy_variants_match_dense_ggn(loss_fn):
    model, x, y = make_model("tanh_mlp")
    _check(GGNOperator(model, loss_fn, (x, y)), dense_ggn(model, loss_fn, [(x, y)]))


@pytest.mark.parametrize("loss_fn", [
    F.mse_loss,
    nn.MSELoss(reduction="sum"),
    lambda out, t: F.smooth_l1_loss(out, t, beta=2.0),
    lambda out, t: torch.log(torch.cosh(out - t)).mean(),
], ids=["mse", "mse_sum", "smooth_l1", "log_cosh"])
def test_regression_losses_match_dense_ggn(loss_fn):
    model, x, y = _regression()
    _check(GGNOperator(model, loss_fn, (x, y)), dense_ggn(model, loss_fn, [(x, y)]))


@pytest.mark.parametrize("loss_fn, ignore", [
    (F.cross_entropy, -100),
    (nn.CrossEntropyLoss(ignore_index=1), 1),
    (nn.CrossEntropyLoss(ignore_index=-1, reduction="sum", label_smoothing=0.2), -1),
], ids=["default", "a_class", "sum_smoothed"])
def test_ignored_targets_give_the_exact_ggn(loss_fn, ignore):
    model, x, y = make_model("gelu_mlp")
    y = y.clone()
    y[[0, 3, 4, 9]] = ignore
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    _check(GGNOperator(model, loss_fn, loader), dense_ggn(model, loss_fn, loader))


@pytest.mark.parametrize("loss_fn, label", [
    (F.cross_entropy, 5),
    (F.cross_entropy, -1),
    (nn.CrossEntropyLoss(ignore_index=-1), -100),
    (nn.CrossEntropyLoss(label_smoothing=0.1), 3),
], ids=["too_large", "negative", "default_ignore_of_another_loss", "smoothed"])
@pytest.mark.parametrize("operator", [GGNOperator, HessianOperator], ids=["ggn", "hessian"])
def test_class_targets_out_of_range_are_refused(operator, loss_fn, label):
    model, x, y = make_model("tanh_mlp")
    y = y.clone()
    y[2] = label
    H = operator(model, loss_fn, (x, y))
    with pytest.raises(ValueError, match=rf"class target {label} is out of range for 3 classes"):
        H @ torch.ones(H.shape[0])


def test_a_batch_of_ignored_targets_is_refused_under_a_mean():
    model, x, y = make_model("tanh_mlp")
    for operator in (GGNOperator, HessianOperator):
        H = operator(model, F.cross_entropy, [(x[:4], torch.full((4,), -100)), (x, y)])
        with pytest.raises(ValueError, match="every target of a batch equals ignore_index=-100"):
            H @ torch.ones(H.shape[0])


def test_sparse_embedding_gradients_match_the_dense_twin():
    sparse, dense, ids, y = token_bag_twins()
    for data in ([(ids[:5], y[:5]), (ids[5:], y[5:])], [(ids, y)]):
        _check(GGNOperator(sparse, F.cross_entropy, data if len(data) > 1 else data[0]),
               dense_ggn(dense, F.cross_entropy, data))


def test_dataset_mode_weights_unequal_batches_by_sample_count():
    model, x, y = make_model("conv_bn")
    loader = [(x[:7], y[:7]), (x[7:10], y[7:10]), (x[10:], y[10:])]
    G = GGNOperator(model, F.cross_entropy, loader, max_block=2)
    _check(G, dense_ggn(model, F.cross_entropy, loader))


def test_sub_block_is_the_block_of_the_full_ggn():
    model, x, y = make_model("gelu_mlp")
    G = GGNOperator(model, F.cross_entropy, (x, y), params=["2.*"])
    full = dense_ggn(model, F.cross_entropy, [(x, y)])
    start = sum(p.numel() for p in model[0].parameters())
    stop = start + sum(p.numel() for p in model[2].parameters())
    _check(G, full[start:stop, start:stop])


def test_positive_semi_definite_and_symmetric():
    model, x, y = make_model("gelu_mlp")
    G = GGNOperator(model, F.cross_entropy, (x, y))
    dense = G @ torch.eye(G.shape[0])
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() >= -1e-10
    assert torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, [(x, y)])).min() < -1e-6
    top = eigenvalues(G, k=1, tol=1e-10, seed=0).values[0]
    assert abs(top - torch.linalg.eigvalsh(dense)[-1]) < 1e-9


def test_equals_the_hessian_for_a_linear_model_with_squared_error():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    G = GGNOperator(model, F.mse_loss, (x, y))
    _check(G, dense_hessian(model, F.mse_loss, [(x, y)]))
    H = HessianOperator(model, F.mse_loss, (x, y))
    V = torch.randn(G.shape[0], 2)
    torch.testing.assert_close(G @ V, H @ V, rtol=1e-10, atol=1e-12)


def test_parameters_that_do_not_reach_the_outputs_get_zero_blocks():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Partial().double()
    G = GGNOperator(model, F.mse_loss, (torch.randn(5, 3), torch.randn(5, 2)))
    blocks = dict(zip(G.param_names, G.split(G @ torch.ones(G.shape[0]))))
    assert blocks["unused.weight"].abs().max() == 0 and blocks["used.weight"].abs().max() > 0
    linear_loss = GGNOperator(model, lambda out, t: (out * t).sum(), (torch.randn(5, 3), torch.randn(5, 2)))
    assert (linear_loss @ torch.ones(G.shape[0])).abs().max() == 0


# ---------------------------------------------------------------- bad input


def test_forward_hook_is_refused():
    model, x, y = make_model("tanh_mlp")
    with pytest.raises(TypeError, match="forward="):
        GGNOperator(model, F.cross_entropy, (x, y), forward=lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def test_batches_must_be_pairs():
    model, x, y = make_model("tanh_mlp")
    G = GGNOperator(model, F.cross_entropy, {"x": x, "y": y})
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        G @ torch.ones(G.shape[0])


def test_non_scalar_loss_is_refused():
    model, x, y = make_model("tanh_mlp")
    G = GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="scalar"):
        G @ torch.ones(G.shape[0])


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match="eval"):
        GGNOperator(model, F.mse_loss, (torch.randn(4, 3), torch.randn(4, 2)))
