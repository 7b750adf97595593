"""curvkit's fused CPU kernels (csrc/) against the foreach path, on a model of many small tensors.

A 40-layer MLP of Linear(24, 24) + tanh (80 parameter tensors, 24,000 parameters), float32, batch 32,
one thread. Two parts, each timed interleaved (one repetition of every variant per round, medians
over rounds), so the ratios compare like with like on a busy machine:

1. whole AdaHessian steps (update_each=1: forward, gradient with graph, one Hessian-vector product,
   probes, update): fused (kernels) / foreach (the reference path with the same Philox probes) /
   foreach with torch.Generator probes (the previous default, an estimator callable), and the
   autograd floor (forward + grad(create_graph) + one HVP, no optimizer work at all);
2. the elementwise phase alone on the same tensors (everything in a step but the autograd
   products): z * Hz, the AdaHessian update and the next step's probe draw; the Sophia update by itself.

Targets: fused step <= 0.85x the foreach step; elementwise phase >= 2x faster.

    python benchmarks/kernels.py             # about 20 s on 2 CPU cores (+ about 20 s to build the kernels once)
    python benchmarks/kernels.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from curvkit import kernels
from curvkit.kernels import build, reference
from curvkit.optim import AdaHessian

STEP_TARGET = 0.85
ELEMENTWISE_TARGET = 2.0



# The baseline the kernels replace: probes from a torch.Generator, then z * Hz and the foreach update.
def rademacher_like(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Independent +-1 tensors shaped like ``tensors``, drawn in one call from ``generator``."""
    sizes = [t.numel() for t in tensors]
    flat = torch.randint(0, 2, (sum(sizes),), generator=generator, device=generator.device, dtype=torch.int8)
    flat = flat.to(device=tensors[0].device, dtype=tensors[0].dtype).mul_(2).sub_(1)
    return [z.view(t.shape).to(t) for z, t in zip(flat.split(sizes), tensors)]


def hutchinson_diagonal(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                        generator: torch.Generator, n_samples: int = 1) -> list[torch.Tensor]:
    r"""Mean over ``n_samples`` Rademacher probes of z * (H z), per parameter.

    ``grads`` must carry a graph (from ``create_graph=True``); the graph is released after the
    last probe. Parameters that the gradients do not depend on get zeros.
    """
    total = None
    for i in range(n_samples):
        zs = rademacher_like(params, generator)
        hz = torch.autograd.grad(grads, params, zs, retain_graph=i < n_samples - 1, allow_unused=True)
        d = [z.mul_(h) if h is not None else torch.zeros_like(z) for z, h in zip(zs, hz)]
        if total is None:
            total = d
        else:
            torch._foreach_add_(total, d)
    if n_samples > 1:
        torch._foreach_div_(total, float(n_samples))
    return total


def make_model(layers: int = 40, width: int = 24) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks[:-1]).float()


def generator_probes(params, grads, generator):
    """The pre-kernel estimator: Hutchinson with probes from a torch.Generator, one foreach multiply."""
    return hutchinson_diagonal(grads, params, generator, 1)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of every variant, one block of ``inner`` calls per variant per round."""
    for f in variants.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def step_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], object]]:
    def stepper(**kwargs):
        twin = copy.deepcopy(model)
        opt = AdaHessian(twin.parameters(), lr=1e-3, seed=0, **kwargs)
        return lambda: opt.step(lambda: F.cross_entropy(twin(x), y))

    params = list(model.parameters())
    ones = [torch.ones_like(p) for p in params]

    def floor():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        return torch.autograd.grad(grads, params, ones)

    return {"fused": stepper(fused=True), "foreach": stepper(fused=False),
            "foreach + Generator probes": stepper(fused=False, estimator=generator_probes),
            "autograd floor": floor}


def elementwise_variants(model: nn.Module) -> dict[str, Callable[[], object]]:
    """The optimizer's work around the autograd products, on fixed stand-ins for Hz and the gradient."""
    g = torch.Generator().manual_seed(1)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    hz = [torch.randn(p.shape, generator=g) for p in params]
    n = len(params)
    state = {name: ([p.clone() for p in params], [torch.zeros_like(p) for p in params],
                    [torch.zeros_like(p) for p in params]) for name in ("fused", "foreach", "generator")}
    # probes regenerated from (seed, offset) = (0, 1) each call: identical work in every round
    generator = torch.Generator().manual_seed(0)
    bc1, bc2 = [0.1] * n, [0.01] * n
    hyper = (1e-3, 0.9, 0.999, 1e-4, 0.0, 1.0, bc1, bc2)

    z_fused, z_foreach = reference.rademacher(params, 0, 1), reference.rademacher(params, 0, 1)

    def fused():  # what a step does: D = z * Hz, the update, and the next draw written over z, in one call
        p, m, v = state["fused"]
        kernels.adahessian_step_(p, grads, m, v, hz, *hyper, probes=z_fused, next_probes=z_fused, probe_seed=0,
                                 next_offset=1, fused=True)

    def foreach(probes):
        def run():
            p, m, v = state["foreach" if probes is None else "generator"]
            if probes is None:  # the same work on the reference path
                reference.adahessian_step_(p, grads, m, v, hz, *hyper, probes=z_foreach, next_probes=z_foreach,
                                           probe_seed=0, next_offset=1)
            else:  # the baseline: torch.Generator probes, z * Hz, the foreach update
                z = rademacher_like(p, probes)
                torch._foreach_mul_(z, hz)
                reference.adahessian_step_(p, grads, m, v, z, *hyper)
        return run

    def sophia(step):
        p, m = [q.clone() for q in params], [torch.zeros_like(q) for q in params]
        h = [torch.ones_like(q) for q in params]
        return lambda: step(p, grads, m, h, hz, 1e-3, 0.965, 0.99, 0.04, 1e-12, 0.1)

    return {
        "AdaHessian phase, fused": fused,
        "AdaHessian phase, foreach": foreach(None),
        "AdaHessian phase, foreach + Generator probes": foreach(generator),
        "Sophia update, fused": sophia(lambda *a: kernels.sophia_step_(*a, fused=True)),
        "Sophia update, foreach": sophia(reference.sophia_step_),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny tensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ready = kernels.available()["cpu"]
    print(f"CPU kernels: {'ready' if ready else 'UNAVAILABLE: ' + str(build.error('cpu'))} "
          f"({time.perf_counter() - start:.1f} s to build or load; {build.build_dir('cpu')})")
    if not ready:
        raise SystemExit(1)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s)\n")

    model = make_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 24, generator=g), torch.randint(0, 24, (32,), generator=g)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: 40 x Linear(24, 24), {len(list(model.parameters()))} tensors, {n_params} parameters, batch 32\n")

    rounds = 15 if args.quick else 60
    steps = interleaved(step_variants(model, x, y), rounds=rounds, inner=3)
    print(f"{'AdaHessian step (update_each=1)':48s} {'ms':>8s} {'fused / this':>13s}")
    for name, t in steps.items():
        print(f"{name:48s} {t * 1e3:8.3f} {steps['fused'] / t:13.3f}")

    phases = interleaved(elementwise_variants(model), rounds=rounds, inner=20)
    print(f"\n{'elementwise phase':48s} {'us':>8s} {'speed-up':>13s}")
    for name, t in phases.items():
        base = phases["Sophia update, fused" if name.startswith("Sophia") else "AdaHessian phase, fused"]
        print(f"{name:48s} {t * 1e6:8.1f} {t / base:12.2f}x")

    step_ratio = steps["fused"] / steps["foreach"]
    old_ratio = steps["fused"] / steps["foreach + Generator probes"]
    phase_speedup = phases["AdaHessian phase, foreach"] / phases["AdaHessian phase, fused"]
    old_speedup = phases["AdaHessian phase, foreach + Generator probes"] / phases["AdaHessian phase, fused"]
    floor_ratio = steps["fused"] / steps["autograd floor"]
    print(f"\nfused step / foreach step: {step_ratio:.3f}x (target <= {STEP_TARGET}): "
          f"{'met' if step_ratio <= STEP_TARGET else 'MISSED'}; "
          f"vs the Generator-probe foreach step {old_ratio:.3f}x; vs the autograd floor {floor_ratio:.3f}x")
    print(f"elementwise phase speed-up: {phase_speedup:.2f}x (target >= {ELEMENTWISE_TARGET}): "
          f"{'met' if phase_speedup >= ELEMENTWISE_TARGET else 'MISSED'}; "
          f"vs the Generator-probe foreach phase {old_speedup:.2f}x")


if __name__ == "__main__":
    main()
