"""Time to a dataset trace of a given accuracy: curvkit ``trace(rtol=...)`` against PyHessian's dataloader trace.

PyHessian has no error estimate, so its time to an accuracy is the time of the number of probes its own
Hutchinson estimate needs for that relative standard error: ``m = max(2, ceil((sd / (rtol |tr H|))^2))``,
with ``sd`` the standard deviation of its per-probe samples pooled over seeds, times its CPU time per probe
(each probe rebuilds every batch's graph). curvkit runs ``trace(H, rtol=rtol, seed=s)`` and stops on its own
standard error; its time is the mean over seeds, and its accuracy (RMSE against the exact trace over seeds,
coverage of the 95% intervals) is printed next to it, so a fast but dishonest stop would show. The exact
trace comes from the dense Hessian of each batch (one double-backward row at a time), so the
models are small. Everything runs in one process, interleaved seed by seed, in CPU time.

Models (float32, trained briefly with Adam on sklearn's digits, BatchNorm in eval mode):

- ``mlp``: MLP 64-32-10 tanh, 4 batches of 256;
- ``resnet``: a residual conv net on 3x16x16 inputs (the digits upsampled, three channels), conv-BN-ReLU and one
  residual block of 8 channels, 4 batches of 32.

    python benchmarks/trace_accuracy.py [--seeds 8] [--models mlp,resnet]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _common import Report, adam_pretrain
from engine_vs_anchors import ResBlock, mlp
from torch import nn

from curvkit.datasets import load_digits_tensors
from curvkit.hessian import HessianOperator, trace

RTOLS = (0.10, 0.05)
METHODS = ("auto",)  # the default: stratified Hutchinson from the first probe on a dataset
TARGET = 0.25          # curvkit's time / PyHessian's time to the same accuracy, at 10%
PYHESSIAN_PROBES = 16  # per seed, for the pooled per-probe standard deviation and the time per probe


def resnet16() -> nn.Module:
    """conv(3->8)-BN-ReLU, a residual block, 4x4 average pooling, linear: 3x16x16 inputs given as 768 features."""
    return nn.Sequential(
        nn.Unflatten(1, (3, 16, 16)),
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        ResBlock(8), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def problem(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The trained model and its 4 batches."""
    torch.manual_seed(0)
    (X, y), _ = load_digits_tensors(seed=0)
    if name == "mlp":
        model, size = adam_pretrain(mlp(), (X, y), 15), 256
    else:
        X = F.interpolate(X.view(-1, 1, 8, 8), size=16, mode="bilinear").repeat(1, 3, 1, 1).flatten(1)
        model, size = adam_pretrain(resnet16(), (X, y), 5), 32
    for p in model.parameters():
        p.grad = None
    return model, [(X[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(4)]


def dense_hessian(model: nn.Module, batch) -> torch.Tensor:
    """The Hessian of the batch's mean cross-entropy in the model's float32, one double-backward row at a time.

    A plain loop in the model's float32: vmapped forward-over-reverse products, or float64 convolutions, take
    minutes per batch on the conv net on CPU; float32 rounding (~1e-6 relative) is far below the errors measured.
    """
    model = copy.deepcopy(model).eval()
    params = list(model.parameters())
    loss = F.cross_entropy(model(batch[0]), batch[1])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(g, params, retain_graph=True)]) for g in grad]
    H = torch.stack(rows).double()
    return (H + H.T) / 2


def exact_statistics(model: nn.Module, batches) -> tuple[float, float, float]:
    """The exact trace of the data's Hessian, and the per-probe standard deviations of Hutchinson's samples.

    With one probe for every batch, Var z^T H z = 2 (||H||_F^2 - sum_i H_ii^2); with a probe per batch
    (stratified), sum_b w_b^2 Var z^T H_b z.
    """
    weights = [len(b[1]) / sum(len(c[1]) for c in batches) for b in batches]
    hessians = [dense_hessian(model, b) for b in batches]
    H = sum(w * h for w, h in zip(weights, hessians))

    def variance(A: torch.Tensor) -> float:
        return float(2 * (A.square().sum() - A.diagonal().square().sum()))

    stratified = sum(w * w * variance(h) for w, h in zip(weights, hessians))
    return float(H.trace()), math.sqrt(variance(H)), math.sqrt(stratified)


def cpu(fn):
    """``(result, CPU seconds)`` of ``fn()``."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def measure(name: str, seeds: int, report: Report) -> None:
    from pyhessian import hessian

    model, batches = problem(name)
    n = sum(p.numel() for p in model.parameters())
    exact, sd_shared, sd_stratified = exact_statistics(model, batches)
    loss = nn.CrossEntropyLoss()

    def pyhessian_run(seed: int) -> list[float]:
        torch.manual_seed(seed)  # PyHessian draws its probes from the global generator
        samples = hessian(model, loss, dataloader=batches, cuda=False).trace(maxIter=PYHESSIAN_PROBES, tol=0.0)
        model.zero_grad(set_to_none=True)
        return samples

    def curvkit_run(seed: int, rtol: float, method: str):
        return trace(HessianOperator(model, loss, batches), rtol=rtol, method=method, seed=seed, progress=False)

    pyhessian_run(0), curvkit_run(0, RTOLS[0], METHODS[0])  # warm-up
    py_samples, py_time = [], 0.0
    ours = {(rtol, method): [] for rtol in RTOLS for method in METHODS}
    fixed_runs, floor_runs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(1, seeds + 1):
            samples, seconds = cpu(lambda: pyhessian_run(seed))
            py_samples += samples
            py_time += seconds
            fixed_runs.append(cpu(lambda: trace(HessianOperator(model, loss, batches), rtol=1e-12,
                                                max_matvecs=PYHESSIAN_PROBES, method="hutchinson", seed=seed,
                                                progress=False)))
            floor_runs.append(cpu(lambda: trace(HessianOperator(model, loss, batches), rtol=1e-12, max_matvecs=2,
                                                method="hutchinson", seed=seed, progress=False)))
            for rtol, method in ours:
                ours[rtol, method].append(cpu(lambda: curvkit_run(seed, rtol, method)))
    fixed = statistics.mean(t for _, t in fixed_runs)
    floor = statistics.mean(t for _, t in floor_runs)
    report.note(f"- {name}: floor for any estimate with an error bar, one data pass with 2 stratified probes: "
                f"{floor * 1e3:.0f} ms, {floor / (2 * py_time / (seeds * PYHESSIAN_PROBES)):.2f}x PyHessian's 2 probes")
    per_probe = py_time / (seeds * PYHESSIAN_PROBES)
    report.target(f"{name}: a {PYHESSIAN_PROBES}-probe dataset trace (fixed probes) <= 0.6x PyHessian's",
                  fixed <= 0.6 * PYHESSIAN_PROBES * per_probe,
                  f"{fixed * 1e3:.0f} ms vs {PYHESSIAN_PROBES * per_probe * 1e3:.0f} ms = "
                  f"{fixed / (PYHESSIAN_PROBES * per_probe):.2f}x;")
    sd = statistics.stdev(py_samples)
    rows = []
    for rtol, method in ours:
        probes = max(2, math.ceil((sd / (rtol * abs(exact))) ** 2))
        py_seconds = probes * per_probe
        results = [r for r, _ in ours[rtol, method]]
        seconds = statistics.mean(t for _, t in ours[rtol, method])
        rmse = math.sqrt(statistics.mean((r.estimate - exact) ** 2 for r in results)) / abs(exact)
        covered = sum(r.ci95[0] <= exact <= r.ci95[1] for r in results)
        methods = ",".join(sorted({r.method for r in results}))
        ratio = seconds / py_seconds
        rows.append([f"{rtol:.0%}", method, f"{probes} x {per_probe * 1e3:.0f} ms = {py_seconds * 1e3:.0f} ms",
                     f"{seconds * 1e3:.0f} ms", f"{statistics.mean(r.matvecs for r in results):.1f}", methods,
                     f"{rmse:.3f}", f"{covered}/{len(results)}", f"{ratio:.2f}x"])
        if rtol == RTOLS[0]:
            report.target(f"{name}: time to a {rtol:.0%} trace, trace(method={method!r}), <= {TARGET}x PyHessian's",
                          ratio <= TARGET,
                          f"{ratio:.2f}x;")
    report.table(f"{name} (n = {n}, 4 batches, exact trace {exact:.4g}; per-probe relative sd: PyHessian's "
                 f"samples {sd / abs(exact):.3f}, exact {sd_shared / abs(exact):.3f} with one probe for all batches, "
                 f"{sd_stratified / abs(exact):.3f} with a probe per batch; {seeds} seeds, mean CPU time)",
                 ["rel. stderr", "curvkit method", "PyHessian: probes x time = time to it", "curvkit trace(rtol)",
                  "products", "method used", "curvkit rel. RMSE", "95% CI covers", "curvkit / PyHessian"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--models", default="mlp,resnet")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, times are CPU time")
    report = Report()
    for name in args.models.split(","):
        measure(name, args.seeds, report)
    report.print_all()


if __name__ == "__main__":
    main()
