"""CrAM against a step computed by hand (torch.func), BatchNorm statistics, resume, hooks, groups, bad input, ranks."""

from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from curvkit.compress import nm_masks
from curvkit.optim import CrAM


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int, seed: int = 1, size: int = 12, features: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def _hand_step(model: nn.Module, x, y, *, lr, rho, mask_fn, plus, sparse_grad, normalize) -> dict[str, torch.Tensor]:
    """One CrAM step written out: g, theta' = theta + rho g (/||g||), M at theta', g_c at M theta', SGD on d."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(values):
        return F.cross_entropy(functional_call(model, values, (x,)), y)

    g = grad(loss)(theta)
    radius = rho / (torch.sqrt(sum((v ** 2).sum() for v in g.values())) + 1e-12) if normalize else rho
    perturbed = {n: theta[n] + radius * g[n] for n in theta}
    weights = [n for n in theta if theta[n].dim() > 1]
    masks = dict(zip(weights, mask_fn([perturbed[n] for n in weights])))
    g_c = grad(loss)({n: perturbed[n] * masks[n] if n in masks else perturbed[n] for n in theta})
    direction = {n: g_c[n] * masks[n] if sparse_grad and n in masks else g_c[n] for n in theta}
    return {n: theta[n] - lr * (direction[n] + g[n] if plus else direction[n]) for n in theta}


def _top_k_by_sorting(sparsity: float):
    """Global magnitude mask by a stable sort of all magnitudes (the earliest of equal ones pruned first)."""
    def masks(weights):
        flat = torch.cat([w.abs().reshape(-1) for w in weights])
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
        return [k.view(w.shape) for k, w in zip(keep.split([w.numel() for w in weights]), weights)]
    return masks


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalize", [False, True], ids=["rho_g", "rho_g_over_norm"])
@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse_grad", "dense_grad"])
@pytest.mark.parametrize("plus", [True, False], ids=["CrAM+", "CrAM"])
def test_step_matches_the_hand_computed_update(plus, sparse_grad, normalize):
    model = _mlp()
    opt = CrAM(model.parameters(), lr=0.3, rho=0.2, sparsities=(0.5,), plus=plus, sparse_grad=sparse_grad,
               normalize=normalize, seed=0)
    for x, y in _batches(3):
        expected = _hand_step(model, x, y, lr=0.3, rho=0.2, mask_fn=_top_k_by_sorting(0.5), plus=plus,
                              sparse_grad=sparse_grad, normalize=normalize)
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
        torch.testing.assert_close(_params(model), expected, rtol=1e-12, atol=1e-14)
    assert not loss.requires_grad


def test_multi_sparsity_draws_from_the_optimizer_generator():
    model = _mlp()
    sparsities = (0.3, 0.6, 0.9)
    opt = CrAM(model.parameters(), lr=0.2, rho=0.1, sparsities=sparsities, seed=5)
    draws = torch.Generator().manual_seed(5)
    for x, y in _batches(4):
        s = sparsities[int(torch.randint(3, (1,), generator=draws))]
        expected = _hand_step(model, x, y, lr=0.2, rho=0.1, mask_fn=_top_k_by_sorting(s), plus=True,
                              sparse_grad=True, normalize=False)
        opt.step(lambda: F.cross_entropy(model(x), y))
        torch.testing.assert_close(_params(model), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compression", ["2:4", "4:8", "layer_topk"])
def test_other_compressions_match_the_hand_computed_update(compression):
    model = _mlp()
    opt = CrAM(model.parameters(), lr=0.3, rho=0.2, compression=compression, seed=0,
               **({"sparsities": 0.75} if compression == "layer_topk" else {}))
    if compression == "layer_topk":
        def mask_fn(weights):
            return [_top_k_by_sorting(0.75)([w])[0] for w in weights]
    else:
        def mask_fn(weights):
            return nm_masks(weights, compression)
    for x, y in _batches(2):
        expected = _hand_step(model, x, y, lr=0.3, rho=0.2, mask_fn=mask_fn, plus=True, sparse_grad=True,
                              normalize=False)
        opt.step(lambda: F.cross_entropy(model(x), y))
        torch.testing.assert_close(_params(model), expected, rtol=1e-12, atol=1e-14)


def test_a_callable_compression_gets_the_perturbed_weights_and_all_ones_gives_sam():
    model = _mlp()
    seen = []

    def keep_all(weights, sparsity):
        seen.append((sparsity, [w.clone() for w in weights]))
        return [torch.ones_like(w) for w in weights]

    opt = CrAM(model.parameters(), lr=0.3, rho=0.2, compression=keep_all, sparsities=0.7, plus=False, seed=0)
    (x, y), = _batches(1)
    theta = _params(model)
    g = grad(lambda v: F.cross_entropy(functional_call(model, v, (x,)), y))(theta)
    expected = _hand_step(model, x, y, lr=0.3, rho=0.2, mask_fn=lambda ws: [torch.ones_like(w) for w in ws],
                          plus=False, sparse_grad=True, normalize=False)  # unnormalised SAM
    opt.step(lambda: F.cross_entropy(model(x), y))
    torch.testing.assert_close(_params(model), expected, rtol=1e-12, atol=1e-14)
    assert seen[0][0] == 0.7
    torch.testing.assert_close(seen[0][1], [theta[n] + 0.2 * g[n] for n in ("0.weight", "2.weight")])


def test_a_group_with_compress_false_stays_dense():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with pytest.raises(ValueError, match=r"0\.weight has shape \(4, 1, 3, 3\).*compress=False"):
        CrAM(model.parameters(), lr=0.1, compression="2:4", model=model)
    with pytest.raises(ValueError, match=r"a parameter of the optimizer has shape \(4, 1, 3, 3\)"):
        CrAM(model.parameters(), lr=0.1, compression="nm")
    shapes = []

    def record(weights, sparsity):
        shapes.append([tuple(w.shape) for w in weights])
        return [torch.ones_like(w) for w in weights]

    opt = CrAM([{"params": model[0].parameters(), "compress": False}, {"params": model[3].parameters()}],
               lr=0.1, compression=record, model=model, seed=0)
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert shapes == [[(3, 64)]]
    CrAM([{"params": model[0].parameters(), "compress": False}, {"params": model[3].parameters()}], lr=0.1,
         compression="2:4", model=model).step(lambda: F.cross_entropy(model(x), y))


NORMS = {
    "BatchNorm1d": lambda: (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)), (16, 6)),
    "BatchNorm2d": lambda: (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 16, 3)), (16, 1, 6, 6)),
    "BatchNorm3d": lambda: (nn.Sequential(nn.Conv3d(1, 4, 2), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 8, 3)), (16, 1, 3, 3, 3)),
    "SyncBatchNorm": lambda: (nn.Sequential(nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(4 * 16, 3)), (16, 1, 6, 6)),
    "cumulative BatchNorm (momentum None)": lambda: (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None),
                                                                   nn.Tanh(), nn.Linear(8, 3)), (16, 6)),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_batchnorm_statistics_after_a_step_are_those_of_one_plain_forward(kind):
    torch.manual_seed(0)
    model, shape = NORMS[kind]()
    model.train()
    for _ in range(2):  # statistics that are not at their initial values
        model(torch.randn(*shape))
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    plain = copy.deepcopy(model)
    plain(x)
    opt = CrAM(model.parameters(), lr=0.1, rho=0.5, sparsities=0.9, model=model, seed=0)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert model.training and model[1].track_running_stats
    for name, buffer in plain.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name


def test_without_the_model_the_compressed_pass_updates_batchnorm_too():
    torch.manual_seed(0)
    model, shape = NORMS["BatchNorm1d"]()
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    CrAM(model.parameters(), lr=0.1, seed=0).step(lambda: F.cross_entropy(model.train()(x), y))
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.parametrize("compression", ["topk", "nm"])
def test_resume_is_bit_exact_whatever_the_global_rng_does(compression):
    batches = _batches(6, seed=3)
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.1, compression=compression,
                  sparsities=(0.3, 0.6, 0.9) if compression == "topk" else None)

    def run(model, opt, part):
        for x, y in part:
            opt.step(lambda: F.cross_entropy(model(x), y))

    model = _mlp()
    opt = CrAM(model.parameters(), seed=0, **kwargs)
    run(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, batches[3:])

    def resumed(with_generator: bool) -> nn.Module:
        again = _mlp(seed=9)
        again.load_state_dict(saved_model)
        opt2 = CrAM(again.parameters(), seed=123, **kwargs)
        opt2.load_state_dict(saved_opt if with_generator else {k: v for k, v in saved_opt.items() if k != "cram"})
        torch.manual_seed(2024)
        torch.rand(17)
        run(again, opt2, batches[3:])
        assert opt2.base_optimizer.state is opt2.state and opt2.base_optimizer.param_groups is opt2.param_groups
        return again

    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed(True).parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed(False).parameters()))


def test_param_groups_are_the_base_optimizers_so_schedulers_and_zero_grad_work():
    model = _mlp()
    opt = CrAM(model.parameters(), torch.optim.SGD, lr=0.4, momentum=0.5, rho=0.1, seed=0)
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["momentum"] == 0.5
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    (x, y), = _batches(1)
    opt.step(lambda: F.cross_entropy(model(x), y))
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.2
    assert all(p.grad is not None for p in model.parameters()) and len(opt.state) == 4
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Linear(3, 2)
    opt.add_param_group({"params": extra.parameters(), "rho": 0.0})
    group = opt.base_optimizer.param_groups[-1]
    assert group["rho"] == 0.0 and group["lr"] == 0.4 and group["compress"] and group["momentum"] == 0.5


def test_step_hooks_run_once_per_step():
    model = _mlp()
    opt = CrAM(model.parameters(), lr=0.1, seed=0)
    calls = []
    handles = [opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
               opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
               register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
               register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o)))]
    try:
        (x, y), = _batches(1)
        opt.step(lambda: F.cross_entropy(model(x), y))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", opt), ("pre", opt), ("post", opt), ("global post", opt)]


def _closure_calling_backward(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_bad_input_is_rejected_with_what_to_do():
    model = _mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        CrAM(params, lr=0.1, rho=-0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        CrAM([{"params": params, "rho": -1.0}], lr=0.1)
    for bad in (1.0, -0.1, (0.5, 1.2), ()):
        with pytest.raises(ValueError, match=r"sparsities must be fractions in \[0, 1\)"):
            CrAM(params, lr=0.1, sparsities=bad)
    with pytest.raises(ValueError, match="compression must be 'topk', 'layer_topk', 'nm', an N:M pattern"):
        CrAM(params, lr=0.1, compression="magnitude")
    with pytest.raises(ValueError, match="'N:M' with integers 0 < N < M"):
        CrAM(params, lr=0.1, compression="4:2")
    with pytest.raises(ValueError, match="sparsities applies to top-k and callable compressions only"):
        CrAM(params, lr=0.1, compression="2:4", sparsities=(0.5,))
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer class"):
        CrAM(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="there are none: use the base optimizer alone"):
        CrAM([p for p in params if p.dim() == 1], lr=0.1)
    opt = CrAM(params, lr=0.1, seed=0)
    (x, y), = _batches(1)
    before = _params(model)
    with pytest.raises(RuntimeError, match="the closure called backward"):
        opt.step(_closure_calling_backward(model, x, y))
    with pytest.raises(ValueError, match="scalar tensor that requires grad.*got float"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    torch.testing.assert_close(_params(model), before, rtol=0, atol=0)
    wrong = CrAM(params, lr=0.1, compression=lambda ws, s: [torch.ones(2)], seed=0)
    with pytest.raises(ValueError, match="one mask per weight with the weight's shape"):
        wrong.step(lambda: F.cross_entropy(model(x), y))
    torch.testing.assert_close(_params(model), before, rtol=0, atol=0)  # restored after a failed step


# ------------------------------------------------------------------ two gloo ranks

STEPS = 4


def _train(net, batches, rank_slice, **kwargs):
    opt = CrAM(net.parameters(), lr=0.2, momentum=0.9, rho=0.1, sparsities=(0.3, 0.6, 0.9), **kwargs)
    for x, y in batches:
        opt.step(lambda: F.cross_entropy(net(x[rank_slice]), y[rank_slice]))
    return torch.cat([p.detach().flatten() for p in net.parameters()]), opt


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_default_dtype(torch.float64)
        batches = _batches(STEPS, seed=7, size=24)
        shard = slice(rank * 24 // world, (rank + 1) * 24 // world)
        torch.manual_seed(100 + rank)  # a different global RNG on every rank must not matter
        entropy, _ = _train(_mlp(), batches, shard, seed=None)
        replicas, opt = _train(_mlp(), batches, shard, seed=11)
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        wrapped, ddp_opt = _train(ddp, batches, shard, seed=11, model=ddp)
        assert opt.distributed and not ddp_opt.distributed
        torch.save({"entropy": entropy, "replicas": replicas, "ddp": wrapped}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stay_in_sync_with_replicas_and_with_ddp(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    single, _ = _train(_mlp(), _batches(STEPS, seed=7, size=24), slice(None), seed=11, distributed=False)
    torch.testing.assert_close(rank0["replicas"], single, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rank0["ddp"], single, rtol=1e-10, atol=1e-12)
    assert not torch.equal(rank0["entropy"], single)


def test_a_closure_that_runs_backward_and_returns_the_loss_detached_gives_the_same_step():
    model = _mlp()
    twin = copy.deepcopy(model)
    (x, y), = _batches(1)
    a = CrAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05, sparsities=(0.5, 0.7), seed=3)
    b = CrAM(twin.parameters(), lr=0.1, momentum=0.9, rho=0.05, sparsities=(0.5, 0.7), seed=3)
    assert not b.next_step_needs_graph()

    def lightning_style():  # what Lightning's closure does: zero_grad, backward, return the loss detached
        b.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin(x), y)
        loss.backward(create_graph=b.next_step_needs_graph())
        return loss.detach()

    for _ in range(3):
        loss_a = a.step(lambda: F.cross_entropy(model(x), y))
        loss_b = b.step(lightning_style)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(_params(model), _params(twin), rtol=1e-12, atol=1e-14)
