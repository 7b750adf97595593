"""HessianOperator against exact dense Hessians, and the behaviour users rely on."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.hessian import GGNOperator, HessianOperator
from tests._models import dense_hessian, hessian_case, make_model, token_bag_twins


def _products(H, D, seed=0):
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(seed))
    return H @ V, D @ V


def test_products_match_dense_hessian(model_and_hessian):
    model, data, D = model_and_hessian
    H = HessianOperator(model, F.cross_entropy, data)
    assert H.shape == D.shape
    got, want = _products(H, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert H.matvecs == 3


def test_ignored_targets_give_the_exact_hessian():
    model, x, y = make_model("attention")
    y = y.clone()
    y[[1, 5]] = -100
    H = HessianOperator(model, F.cross_entropy, (x, y))
    got, want = _products(H, dense_hessian(model, F.cross_entropy, [(x, y)]))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sparse_embedding_gradients_match_the_dense_twin():
    sparse, dense, ids, y = token_bag_twins()
    data = [(ids[:5], y[:5]), (ids[5:], y[5:])]
    D = dense_hessian(dense, F.cross_entropy, data)
    for batches in (data, (ids, y)):
        got, want = _products(HessianOperator(sparse, F.cross_entropy, batches), D if batches is data else
                              dense_hessian(dense, F.cross_entropy, [batches]))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert sparse.embed.weight.grad is None


def test_sub_block_by_glob_and_parameter():
    model, x, y = make_model("gelu_mlp")
    names = [n for n, _ in model.named_parameters()]
    by_glob = HessianOperator(model, F.cross_entropy, (x, y), params=["0.*", "4.weight"])
    assert by_glob.param_names == ["0.weight", "0.bias", "4.weight"]
    by_param = HessianOperator(model, F.cross_entropy, (x, y), params=[model[4].weight, model[0].bias, model[0].weight])
    assert by_param.param_names == by_glob.param_names
    D = dense_hessian(model, F.cross_entropy, [(x, y)], names=by_glob.param_names)
    got, want = _products(by_glob, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    full = dense_hessian(model, F.cross_entropy, [(x, y)], names=names)
    sizes = [p.numel() for p in model.parameters()]
    idx = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in (0, 1, 4)])
    torch.testing.assert_close(D, full[idx][:, idx])


def test_dataset_mode_weights_unequal_batches_by_sample_count():
    model, x, y = make_model("conv_bn")
    loader = [(x[:7], y[:7]), (x[7:10], y[7:10]), (x[10:], y[10:])]
    H = HessianOperator(model, F.cross_entropy, loader)
    D = dense_hessian(model, F.cross_entropy, [(x, y)])
    got, want = _products(H, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dataloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    got_dl, _ = _products(HessianOperator(model, F.cross_entropy, dataloader), D)
    torch.testing.assert_close(got_dl, want, rtol=1e-10, atol=1e-12)


def test_bn_modes_use_running_or_batch_statistics():
    model, x, y = make_model("conv_bn")
    eval_H = HessianOperator(model, F.cross_entropy, (x, y), bn_mode="eval")
    batch_H = HessianOperator(model, F.cross_entropy, (x, y), bn_mode="batch")
    D_eval = dense_hessian(model, F.cross_entropy, [(x, y)])
    train_copy = copy.deepcopy(model).train()
    D_batch = dense_hessian(train_copy, F.cross_entropy, [(x, y)])
    got, want = _products(eval_H, D_eval)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got, want = _products(batch_H, D_batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(D_eval, D_batch)


def test_forward_hook_handles_dict_batches():
    model, x, y = make_model("tanh_mlp")
    batch = {"features": x, "label": y}
    H = HessianOperator(model, None, batch, forward=lambda m, b: F.cross_entropy(m(b["features"]), b["label"]))
    D = dense_hessian(model, F.cross_entropy, [(x, y)])
    got, want = _products(H, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_multihead_attention_uses_a_twice_differentiable_kernel():
    """nn.MultiheadAttention's fused CPU kernel has no double backward; products must still be right."""

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, inp):
            return self.attn(inp, inp, inp, need_weights=False)[0]

    torch.manual_seed(0)
    model = SelfAttention().double().eval()
    x, target = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    H = HessianOperator(model, F.mse_loss, (x, target))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))

    def grad_at(t):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for p, c in zip(shifted.parameters(), H.split(v)):
                p.add_(t * c)
        grads = torch.autograd.grad(F.mse_loss(shifted(x), target), list(shifted.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    finite_difference = (grad_at(1e-6) - grad_at(-1e-6)) / 2e-6
    torch.testing.assert_close(H @ v, finite_difference, rtol=1e-5, atol=1e-7)


def test_unused_and_constant_gradient_parameters_get_zero_blocks():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)
            self.shift = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.used(x)

    model = Partial().double()
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    H = HessianOperator(model, lambda out, t: F.mse_loss(out, t) + model.shift * 0 + 0.0, (x, y))
    out = H @ torch.ones(H.shape[0])
    blocks = dict(zip(H.param_names, H.split(out)))
    assert blocks["unused.weight"].abs().max() == 0 and blocks["shift"].abs().max() == 0
    assert blocks["used.weight"].abs().max() > 0


def test_float32_model_products_follow_parameter_dtype():
    model, x, y = make_model("tanh_mlp")
    D = dense_hessian(model, F.cross_entropy, [(x, y)])
    model32 = copy.deepcopy(model).float()
    H = HessianOperator(model32, F.cross_entropy, (x.float(), y))
    assert H.dtype == torch.float32
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, D @ v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- blocks of products


@pytest.mark.parametrize("block_products", ["auto", "batched", "loop"])
@pytest.mark.parametrize("kind", ["tanh_mlp", "conv_bn"])
def test_every_way_of_computing_a_block_matches_the_dense_hessian(kind, block_products):
    model, data, D = hessian_case(kind)
    H = HessianOperator(model, F.cross_entropy, data, block_products=block_products)
    V = torch.randn(D.shape[0], 4, generator=torch.Generator().manual_seed(0))
    for _ in range(H.BLOCK_TRIALS + 1):  # while the choice is measured, and after
        torch.testing.assert_close(H @ V, D @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H @ V[:, 0], D @ V[:, 0], rtol=1e-10, atol=1e-12)


def _costed(H, monkeypatch, single: float, batched: float) -> dict[str, int]:
    """Make a single product cost ``single`` and a batched one ``batched`` per row on a fake clock; count calls."""
    now, calls = [0.0], {"single": 0, "batched": 0}
    product, batched_products = H._product, H._batched_products

    def costed_product(state, v):
        calls["single"] += 1
        now[0] += single
        return product(state, v)

    def costed_batched(state, rows):
        calls["batched"] += 1
        now[0] += batched * len(rows)
        return batched_products(state, rows)

    monkeypatch.setattr(H, "_clock", lambda: now[0])
    monkeypatch.setattr(H, "_product", costed_product)
    monkeypatch.setattr(H, "_batched_products", costed_batched)
    return calls


@pytest.mark.parametrize(("batched", "way"), [(3.0, "loop"), (0.5, "batched")])
def test_auto_keeps_the_cheaper_way_per_block_size(monkeypatch, batched, way):
    model, data, D = hessian_case("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, data)
    calls = _costed(H, monkeypatch, single=1.0, batched=batched)
    V = torch.randn(D.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(H.BLOCK_TRIALS):  # measured: the first row alone, the other three batched
        torch.testing.assert_close(H @ V, D @ V, rtol=1e-10, atol=1e-12)
    assert calls == {"single": H.BLOCK_TRIALS, "batched": H.BLOCK_TRIALS}
    torch.testing.assert_close(H @ V, D @ V, rtol=1e-10, atol=1e-12)
    want = {"single": H.BLOCK_TRIALS + 4, "batched": H.BLOCK_TRIALS} if way == "loop" else \
        {"single": H.BLOCK_TRIALS, "batched": H.BLOCK_TRIALS + 1}
    assert calls == want
    H @ V[:, :3]  # another block size is measured afresh
    assert calls == {"single": want["single"] + 1, "batched": want["batched"] + 1}


def test_a_model_vmap_cannot_batch_gets_single_products(monkeypatch):
    model, data, D = hessian_case("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, data, block_products="batched")
    calls = {"batched": 0}

    def unbatchable(state, rows):
        calls["batched"] += 1
        raise RuntimeError("Batching rule not implemented for aten::something")

    monkeypatch.setattr(H, "_batched_products", unbatchable)
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(H @ V, D @ V, rtol=1e-10, atol=1e-12)
    assert calls["batched"] == 1


def test_bad_block_products_are_refused():
    model, x, y = make_model("tanh_mlp")
    with pytest.raises(ValueError, match="block_products must be one of"):
        HessianOperator(model, F.cross_entropy, (x, y), block_products="vmap")
    with pytest.raises(ValueError, match="GGNOperator has no batched pass"):
        GGNOperator(model, F.cross_entropy, (x, y), block_products="batched")


# ---------------------------------------------------------------- bad input


def test_non_scalar_loss_is_refused():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="scalar"):
        H @ torch.ones(H.shape[0])


def test_no_trainable_parameters_is_refused():
    model, x, y = make_model("tanh_mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, F.cross_entropy, (x, y))


def test_unknown_parameter_pattern_is_refused():
    model, x, y = make_model("tanh_mlp")
    with pytest.raises(ValueError, match="matches no parameter"):
        HessianOperator(model, F.cross_entropy, (x, y), params=["layer9.*"])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, F.cross_entropy, (x, y), params=[nn.Parameter(torch.zeros(3))])


def test_empty_data_and_one_shot_iterators_are_refused():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        H @ torch.ones(H.shape[0])
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianOperator(model, F.cross_entropy, ((x, y) for _ in range(2)))


def test_non_finite_loss_and_products_name_the_problem():
    model, x, y = make_model("tanh_mlp")
    bad = x.clone()
    bad[0, 0] = float("nan")
    H = HessianOperator(model, F.cross_entropy, (bad, y))
    with pytest.raises(FloatingPointError, match="loss"):
        H @ torch.ones(H.shape[0])

    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            self.b = nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return (x * self.b).sum() + self.a.abs().pow(1.5).sum()

    H = HessianOperator(Sqrt(), lambda out, _: out, (torch.ones(1, 2), torch.zeros(1)))
    with pytest.raises(FloatingPointError, match="'a'"):
        H @ torch.ones(H.shape[0])


def test_dropout_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).double().train()
    with pytest.raises(ValueError, match="Dropout"):
        HessianOperator(model, F.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    HessianOperator(model.eval(), F.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


def test_op_without_double_backward_is_explained():
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # a kernel with no double backward

    class FlashAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return flash(q.contiguous(), k.contiguous(), v.contiguous())[0].flatten(1)

    model = FlashAttention().double()
    H = HessianOperator(model, F.mse_loss, (torch.randn(2, 3, 4), torch.randn(2, 12)))
    with pytest.raises(RuntimeError, match="does not support double backward"):
        H @ torch.ones(H.shape[0])


def test_a_model_on_the_meta_device_is_refused_up_front():
    from curvkit.hessian import GGNOperator, input_hvp, layerwise

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    for call in (lambda: HessianOperator(model, F.cross_entropy, (x, y)),
                 lambda: GGNOperator(model, F.cross_entropy, (x, y)),
                 lambda: layerwise(model, F.cross_entropy, (x, y)),
                 lambda: input_hvp(model, F.cross_entropy, x, y, torch.ones_like(x))):
        with pytest.raises(ValueError, match=r"'0.weight' is on the meta device.*to_empty.*load_state_dict"):
            call()
    model[0].to_empty(device="cpu")
    model[2].to_empty(device="cpu")
    with pytest.raises(ValueError, match="buffer '1.running_mean' is on the meta device"):
        HessianOperator(model, F.cross_entropy, (x, y), params=["0.*"])


def test_bad_vector_shapes_are_refused():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="shape"):
        H @ torch.ones(3)
    with pytest.raises(ValueError, match="shaped like H.params"):
        H @ [torch.ones(3)]
    with pytest.raises(ValueError, match="bn_mode"):
        HessianOperator(model, F.cross_entropy, (x, y), bn_mode="train")


def test_global_rng_is_untouched():
    from curvkit.hessian import eigenvalues, trace

    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    eigenvalues(H, k=2, seed=0)
    with pytest.warns(RuntimeWarning, match="rtol"):
        trace(H, seed=0, max_matvecs=20)
    assert torch.equal(state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])
