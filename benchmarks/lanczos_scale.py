"""Lanczos at scale: top-1 eigenvalue time against the time of the products it used, and the memory it holds.

A ~6.3M-parameter conv net (3x32x32 inputs, batch 8, BatchNorm in eval mode). Each variant runs in a
fresh subprocess so that its peak resident memory is its own:

- ``grown``: the basis grows with the recurrence (curvkit's default);
- ``preallocated``: the whole basis of min(n, 100 + 20k) + 1 vectors allocated up front, as before
  (reproduced by one chunk large enough for every step);
- ``float32``: the grown basis stored in float32.

Printed per variant: products used, eigenvalue CPU time / the same number of products' CPU time (target
<= 1.5), the basis the recurrence allocated and the growth of the process's peak resident memory during
the eigenvalue run, both in units of one float64 parameter vector (target <= products + 4). Resident
memory counts only pages written, so an allocation that is never filled does not show in it.

    python benchmarks/lanczos_scale.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _net():
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = [*block(3, 64), *block(64, 128), nn.MaxPool2d(2), *block(128, 256), nn.MaxPool2d(2),
              *block(256, 512), *block(512, 512), nn.MaxPool2d(2), *block(512, 256),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    return model, x, y


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(variant: str) -> dict:
    import torch
    import torch.nn.functional as F

    import curvkit.hessian.lanczos as lanczos
    from curvkit.hessian import HessianOperator, eigenvalues

    torch.set_num_threads(2)
    model, x, y = _net()
    H = HessianOperator(model, F.cross_entropy, (x, y))
    n = H.shape[0]
    v = torch.randn(n, dtype=torch.float64)
    H @ v                                         # build and cache the gradient graph
    start = time.process_time()
    for _ in range(3):
        H @ v
    product = (time.process_time() - start) / 3
    if variant == "preallocated":
        lanczos.CHUNK_BYTES = 2**62
    allocated = []
    step = lanczos.Lanczos.step

    def counted(self):
        step(self)
        allocated.append(sum(c.numel() * c.element_size() for c in self._chunks))

    lanczos.Lanczos.step = counted
    before = _rss_mib()
    start = time.process_time()
    res = eigenvalues(H, k=1, tol=1e-3, seed=0, basis_dtype=torch.float32 if variant == "float32" else torch.float64)
    seconds = time.process_time() - start
    grown = _rss_mib() - before
    vector_bytes = n * 8
    return {"variant": variant, "n": n, "products": res.matvecs, "converged": res.converged,
            "time_over_products": seconds / (res.matvecs * product), "basis_vectors": allocated[-1] / vector_bytes,
            "rss_vectors": grown * 2**20 / vector_bytes, "product_s": product}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(run(sys.argv[1])))
        return
    print(f"{'variant':13s} {'n':>9s} {'products':>8s} {'product s':>9s} {'time/products':>13s} "
          f"{'basis (vectors)':>15s} {'peak RSS growth (vectors)':>25s}")
    for variant in ("grown", "preallocated", "float32"):
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['variant']:13s} {r['n']:9d} {r['products']:8d} {r['product_s']:9.2f} "
              f"{r['time_over_products']:13.2f} {r['basis_vectors']:15.1f} {r['rss_vectors']:25.1f}")


if __name__ == "__main__":
    main()
