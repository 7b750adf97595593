"""Dataset-mode trace against PyHessian's dataloader trace, and a 2-D landscape against plain forward passes.

Both comparisons are timed in one process, interleaved, in CPU time (robust on a shared machine):

1. a 4-batch dataset trace with 24 Rademacher probes: curvkit (each batch's graph serves a block of
   probes) vs PyHessian ``hessian(dataloader=...).trace(maxIter=24, tol=0)`` (graph rebuilt per probe);
   target <= 0.6x.
2. a 21x21 loss landscape on the digits MLP (all 1437 training samples) vs 441 sequential
   ``loss_fn(model(x), y)`` forward passes; target <= 1.0x.

    python benchmarks/scale_and_landscape.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from torch import nn

from curvkit.analysis import landscape_2d, random_direction
from curvkit.cli.demo import train_mlp
from curvkit.datasets import load_digits_tensors
from curvkit.hessian import HessianOperator, trace


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median CPU time of each callable, alternating between them ``repeats`` times after a warm-up."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(cpu_seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def dataset_trace(model, X, y, repeats: int) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:1024], y[:1024]), batch_size=256)
    loss_fn = nn.CrossEntropyLoss()

    def ours():
        trace(HessianOperator(model, loss_fn, loader), max_matvecs=24, rtol=1e-12, method="hutchinson", seed=0,
              progress=False)

    runs = {"curvkit trace (blocks of probes per batch graph)": ours}
    try:
        from pyhessian import hessian

        def theirs():
            model.zero_grad(set_to_none=True)
            hessian(model, loss_fn, dataloader=loader, cuda=False).trace(maxIter=24, tol=0.0)
            model.zero_grad(set_to_none=True)

        runs["PyHessian dataloader trace"] = theirs
    except ImportError as err:
        print(f"PyHessian n/a ({err}); install the bench extra")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved(runs, repeats)
    print("\n### Dataset trace: 4 batches of 256, 24 probes (median CPU time)\n")
    print("| method | cpu time | curvkit / this |\n|---|---|---|")
    base = times["curvkit trace (blocks of probes per batch graph)"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.0f} ms | {base / t:.2f}x |")


def landscape(model, X, y, repeats: int) -> None:
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)

    def grid():
        landscape_2d(model, F.cross_entropy, (X, y), d1, d2, steps=21, progress=False)

    def forwards():
        with torch.no_grad():
            for _ in range(441):
                F.cross_entropy(model(X), y)

    times = interleaved({"landscape_2d 21x21 (vmapped)": grid, "441 sequential forward passes": forwards}, repeats)
    print(f"\n### 21x21 landscape on the digits MLP ({len(y)} samples; median CPU time)\n")
    print("| method | cpu time | landscape / this |\n|---|---|---|")
    base = times["landscape_2d 21x21 (vmapped)"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.0f} ms | {base / t:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, times are CPU time")
    (X, y), _ = load_digits_tensors()
    model = train_mlp((X, y), seconds=2.0)
    dataset_trace(model, X, y, args.repeats)
    landscape(model, X, y, args.repeats)


if __name__ == "__main__":
    main()
