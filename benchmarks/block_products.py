"""Blocks of Hessian-vector products: one batched double backward, single products in a loop, or the auto choice.

For each model, the CPU time per product of a single ``H @ v`` and of a block ``H @ V`` (k columns) computed
batched (``block_products="batched"``), in a loop (``"loop"``) and as chosen by ``"auto"`` (after its timed first
blocks), interleaved round-robin with the order reversed every other round, medians. The vectors are float64, as
curvkit's algorithms pass them; the models are float32. The target: a block never costs more per product than a
single product, i.e. auto / single <= 1 (within noise).

- MLP 64-32-10 tanh, n = 2410, batch 512 (where batching pays: fewer, larger kernels);
- the ~5.1M-parameter conv net of ``benchmarks/lanczos_scale.py``, batch 8 (where it does not).

    python benchmarks/block_products.py             # ~2 min on a 2-core machine
    python benchmarks/block_products.py --no-conv   # the MLP only, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see BENCHMARKS.md: spinning OpenMP waits on a shared machine

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lanczos_scale import _net

from curvkit.hessian import HessianOperator


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    return model, torch.randn(512, 64), torch.randint(0, 10, (512,))


def measure(name: str, model: nn.Module, batch, k: int, reps: int) -> None:
    ops = {way: HessianOperator(model, F.cross_entropy, batch, block_products=way)
           for way in ("loop", "batched", "auto")}
    n = ops["auto"].shape[0]
    gen = torch.Generator().manual_seed(0)
    v, V = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, k, generator=gen, dtype=torch.float64)
    for H in ops.values():
        H @ v                                       # build and cache the gradient graph
    for _ in range(ops["auto"].BLOCK_TRIALS):       # auto times its first blocks of k rows, then keeps a way
        ops["auto"] @ V
    runs = {"single": (lambda: ops["auto"] @ v, 1)}
    runs.update({f"block of {k}, {way}": (lambda H=H: H @ V, k) for way, H in ops.items()})
    times = {label: [] for label in runs}
    for fn, _ in runs.values():
        fn()                                        # warm-up
    for rep in range(reps):
        for label, (fn, columns) in list(runs.items())[::1 if rep % 2 else -1]:  # alternate the order
            start = time.process_time()
            fn()
            times[label].append((time.process_time() - start) / columns)
    per_product = {label: statistics.median(t) for label, t in times.items()}
    single = per_product["single"]
    print(f"\n{name} (n = {n}, batch {len(batch[1])}, median of {reps}; auto chose "
          f"{ops['auto']._block_way(k)} for k = {k})")
    print(f"{'':22s} {'cpu ms / product':>16s} {'/ single':>9s}")
    for label, t in per_product.items():
        print(f"{label:22s} {1e3 * t:16.4g} {t / single:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-conv", action="store_true", help="skip the 5M-parameter conv net")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    model, x, y = _mlp()
    measure("MLP 64-32-10 tanh", model, (x, y), k=8, reps=30)
    if not args.no_conv:
        model, x, y = _net()
        measure("conv net of lanczos_scale.py", model, (x, y), k=4, reps=6)


if __name__ == "__main__":
    main()
