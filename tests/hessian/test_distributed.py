"""HessianOperator under torch.distributed (gloo, localhost): shards of one dataset, identical results."""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from curvkit.hessian import HessianOperator, eigenvalues, trace


def _model_and_data():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.Tanh(), nn.Linear(6, 3, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(45, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (45,), generator=g)
    return model.eval(), x, y


def _shard(x, y, rank, world):
    """Unequal shards split into unequal batches."""
    bounds = [0, 20, 31, 45][: world + 1] if world == 3 else [0, 26, 45]
    xs, ys = x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]
    return [(xs[i:i + 7], ys[i:i + 7]) for i in range(0, len(ys), 7)]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        torch.manual_seed(rank)  # different global RNG per rank must not matter
        model, x, y = _model_and_data()
        H = HessianOperator(model, F.cross_entropy, _shard(x, y, rank, world))
        V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        result = {
            "product": H @ V,
            "eig": eigenvalues(H, k=2, seed=1).values,
            "trace": trace(H, max_matvecs=40, rtol=1e-9, seed=None).estimate,
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _hanging_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    model, x, y = _model_and_data()
    H = HessianOperator(model, F.cross_entropy, (x, y), timeout=2.0)
    if rank == 1:
        time.sleep(8)  # a hung rank: joins no all-reduce until long after the 2 s timeout
        with open(os.path.join(out_dir, "woke.txt"), "w") as fh:
            fh.write(repr(time.time()))
        return
    try:
        H @ torch.ones(H.shape[0], dtype=torch.float64)
        outcome = "no error"
    except RuntimeError as err:
        outcome = str(err)
    with open(os.path.join(out_dir, "outcome.txt"), "w") as fh:
        fh.write(f"{time.time()!r} {outcome}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_give_the_single_process_operator_and_identical_results(tmp_path):
    world = 3
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model, x, y = _model_and_data()
    H = HessianOperator(model, F.cross_entropy, (x, y), distributed=False)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(results[0]["product"], H @ V, rtol=1e-6, atol=1e-12)
    for other in results[1:]:
        assert torch.equal(other["product"], results[0]["product"])
        assert torch.equal(other["eig"], results[0]["eig"])
        assert other["trace"] == results[0]["trace"]  # seed=None: rank 0's entropy is shared
    torch.testing.assert_close(results[0]["eig"], eigenvalues(H, k=2, seed=1).values, rtol=1e-8, atol=1e-10)


def test_a_hung_rank_surfaces_as_an_error_within_the_timeout(tmp_path):
    mp.spawn(_hanging_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    stamp, outcome = (tmp_path / "outcome.txt").read_text().split(" ", 1)
    woke = float((tmp_path / "woke.txt").read_text())
    assert "all-reduce did not finish" in outcome
    assert float(stamp) < woke  # the error came while the other rank was still hung
