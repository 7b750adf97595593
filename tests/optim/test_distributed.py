"""Data-parallel AdaHessian over two gloo processes: replicas stay identical and match one process."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from curvkit.optim import AdaHessian

STEPS = 5


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 3, dtype=torch.float64))
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, x, y


def _train(model, x, y, **kwargs):
    opt = AdaHessian(model.parameters(), lr=0.1, seed=11, **kwargs)
    for _ in range(STEPS):
        opt.step(lambda: F.cross_entropy(model(x), y))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model, x, y = _model_and_data()
        shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        torch.manual_seed(100 + rank)  # different global RNG per rank must not matter
        params = _train(model, x[shard], y[shard])
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stay_in_sync_and_match_full_batch_training(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(rank0, rank1)
    model, x, y = _model_and_data()
    single = _train(model, x, y, distributed=False)
    torch.testing.assert_close(rank0, single, rtol=1e-10, atol=1e-12)
