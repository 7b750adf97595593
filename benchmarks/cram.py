"""CrAM: one-shot pruning accuracy of compression-aware training against SGD, SGD at 2x lr and SAM, on digits.

Four parts, in one process (1 torch thread), on sklearn's 8x8 digits and a small conv-BN net:

1. settings chosen on a validation split carved out of TRAIN: SGD's learning rate (dense accuracy), then
   CrAM+'s rho (accuracy after 90% one-shot pruning with BatchNorm recalibration); every other method
   reuses them (SGD 2x lr doubles the lr: CrAM+ sums two gradients, so its steps are about twice as long);
2. one-shot global magnitude pruning to 50/70/80/90/95% of the weights, with and without BatchNorm
   recalibration, for SGD, SGD 2x lr, SAM (rho 0.05, as CrAM with normalize=True, plus=False and no
   compression), CrAM, CrAM+ (both trained at 90%) and CrAM+-Multi (50/70/90%); mean ± std over 5 seeds;
3. N:M: SGD and CrAM+ trained for 2:4 or 4:8 (the single-input-channel first convolution stays dense),
   pruned to 2:4 and 4:8;
4. step time of CrAM+ and SAM against an SGD step, interleaved step by step (CPU time), and the exact
   global threshold on a ResNet-50-sized set of weights: radix select against concatenation + kthvalue.

    python benchmarks/cram.py            # about 17 minutes on the shared 2-core machine (under load)
    python benchmarks/cram.py --quick    # about 1 minute: a smoke test, not figures
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before torch loads libgomp: spinning OpenMP workers distort timings on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# This checkout's curvkit, wherever an editable install happens to point.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from _common import Report, backward_step
from torch import nn

from curvkit.compress import prune_weights, recalibrate_bn
from curvkit.compress.masks import kth_smallest_magnitude
from curvkit.datasets import load_digits_tensors
from curvkit.optim import CrAM

BATCH = 64
RECALIBRATION_BATCH = 128
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
NM_PATTERNS = ("2:4", "4:8")
FIRST_CONV = "1.weight"      # one input channel: no N:M groups along it; dense under N:M
PLUS_GAP_TARGET = 2.0        # CrAM+ at 90% (BN recalibrated) within 2 points of its own dense accuracy
PLUS_OVER_SGD_TARGET = 3.0   # ... and at least 3 points above SGD
NM_GAP_TARGET = 1.0          # CrAM+ trained for 2:4 within 1 point of its dense accuracy after 2:4 pruning
STEP_TARGET = 2.3            # a CrAM+ step <= 2.3x an SGD step


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tune_seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    rho_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    steps: int = 300
    warmup: int = 30
    threshold_params: int = 25_557_032   # ResNet-50's weights


QUICK = Config(seeds=(0,), tune_seeds=(0,), epochs=4, lr_grid=(0.03, 0.1), rho_grid=(0.1,), steps=40, warmup=5,
               threshold_params=2_000_000)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


# --------------------------------------------------------------------------------------------- methods

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Method:
    """A training method: ``build(model, lr, rho, seed)`` returns (optimizer, step function)."""

    label: str
    build: Callable[[nn.Module, float, float, int], tuple[torch.optim.Optimizer, Step]]


def sgd(lr_scale: float = 1.0) -> Method:
    def build(model, lr, rho, seed):
        opt = torch.optim.SGD(model.parameters(), lr=lr * lr_scale, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        return opt, backward_step(model, opt)
    return Method("SGD" if lr_scale == 1 else f"SGD {lr_scale:g}x lr", build)


def cram(label: str, fixed_rho: float | None = None, groups: bool = False, **kwargs) -> Method:
    """CrAM with the tuned rho (or ``fixed_rho``); ``groups`` leaves the first convolution dense (N:M)."""
    def build(model, lr, rho, seed):
        params = model.parameters()
        if groups:
            first = model.get_parameter(FIRST_CONV)
            params = [{"params": [first], "compress": False},
                      {"params": [p for p in model.parameters() if p is not first]}]
        opt = CrAM(params, torch.optim.SGD, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                   rho=rho if fixed_rho is None else fixed_rho, model=model, seed=seed, **kwargs)
        return opt, lambda x, y: opt.step(lambda: F.cross_entropy(model(x), y))
    return Method(label, build)


def keep_everything(weights, sparsity):
    return [torch.ones_like(w, dtype=torch.bool) for w in weights]


# SAM (Foret et al.): gradient at theta + rho g/||g||, taken as is; CrAM without compression is exactly that.
SAM = cram("SAM rho=0.05", fixed_rho=0.05, compression=keep_everything, normalize=True, plus=False)
CRAM = cram("CrAM (90%)", sparsities=0.9, plus=False)
CRAM_PLUS = cram("CrAM+ (90%)", sparsities=0.9)
CRAM_MULTI = cram("CrAM+-Multi (50/70/90%)", sparsities=(0.5, 0.7, 0.9))
CRAM_NM = {pattern: cram(f"CrAM+ ({pattern})", compression=pattern, groups=True) for pattern in NM_PATTERNS}


# --------------------------------------------------------------------------------------------- helpers


def mean_std(values: list[float]) -> str:
    vals = [100 * v for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def train(method: Method, data, epochs: int, seed: int, lr: float, rho: float) -> nn.Module:
    """``epochs`` of mini-batch training with a cosine learning rate (stepped per batch)."""
    torch.manual_seed(seed)
    model = cnn()
    opt, step = method.build(model, lr, rho, seed)
    X, y = data
    batches = math.ceil(len(y) / BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * batches)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            step(X[idx], y[idx])
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    return (model.eval()(data[0]).argmax(1) == data[1]).float().mean().item()


def one_shot(model: nn.Module, train_data, eval_data, amount: float | None, pattern: str = "global",
             recalibrate: bool = True) -> float:
    exclude = {FIRST_CONV} if pattern != "global" else set()
    pruned = prune_weights(model, amount, pattern, exclude=exclude)
    if recalibrate:
        X, y = train_data
        pruned = recalibrate_bn(pruned, [(X[i:i + RECALIBRATION_BATCH], y[i:i + RECALIBRATION_BATCH])
                                         for i in range(0, len(y), RECALIBRATION_BATCH)])
    return accuracy(pruned, eval_data)


def split(train_data):
    cut = int(0.8 * len(train_data[1]))
    return (train_data[0][:cut], train_data[1][:cut]), (train_data[0][cut:], train_data[1][cut:])


# --------------------------------------------------------------------------------------------- 1. tuning


def tune(train_data, cfg: Config, report: Report) -> tuple[float, float]:
    fit, val = split(train_data)
    rows, lr_scores = [], {}
    for lr in cfg.lr_grid:
        accs = [accuracy(train(sgd(), fit, cfg.epochs, s, lr, 0.0), val) for s in cfg.tune_seeds]
        lr_scores[lr] = statistics.fmean(accs)
        rows.append(["SGD", f"lr={lr:g}", "dense", mean_std(accs)])
    lr = max(cfg.lr_grid, key=lambda v: lr_scores[v])
    rho_scores = {}
    for rho in cfg.rho_grid:
        accs = [one_shot(train(CRAM_PLUS, fit, cfg.epochs, s, lr, rho), fit, val, 0.9) for s in cfg.tune_seeds]
        rho_scores[rho] = statistics.fmean(accs)
        rows.append(["CrAM+ (90%)", f"lr={lr:g}, rho={rho:g}", "90% one-shot, BN recalibrated", mean_std(accs)])
    rho = max(cfg.rho_grid, key=lambda v: rho_scores[v])
    report.table(f"Settings on validation ({len(fit[1])} fit / {len(val[1])} validation samples from TRAIN, "
                 f"{cfg.epochs} epochs, seeds {', '.join(map(str, cfg.tune_seeds))}): chosen lr {lr:g}, rho {rho:g}",
                 ["method", "setting", "criterion", "validation accuracy %"], rows)
    return lr, rho


# --------------------------------------------------------------------------------------------- 2-3. accuracy


def bench_accuracy(train_data, test_data, cfg: Config, lr: float, rho: float, report: Report) -> None:
    methods = [sgd(), sgd(2.0), SAM, CRAM, CRAM_PLUS, CRAM_MULTI]
    results: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        res = results[method.label] = {}
        for seed in cfg.seeds:
            model = train(method, train_data, cfg.epochs, seed, lr, rho)
            res.setdefault("dense", []).append(accuracy(model, test_data))
            for s in SPARSITIES:
                for recal in (True, False):
                    res.setdefault((s, recal), []).append(one_shot(model, train_data, test_data, s, recalibrate=recal))
    header = ["method", "dense"] + [f"{100 * s:g}%" for s in SPARSITIES]
    for recal in (True, False):
        rows = [[label, mean_std(res["dense"])] + [mean_std(res[(s, recal)]) for s in SPARSITIES]
                for label, res in results.items()]
        report.table(f"Test accuracy % after one-shot global magnitude pruning, "
                     f"{'with' if recal else 'without'} BatchNorm recalibration ({len(cfg.seeds)} seeds, "
                     f"{cfg.epochs} epochs, lr {lr:g}, rho {rho:g})", header, rows)
    plus, base = results[CRAM_PLUS.label], results["SGD"]
    gaps = [d - p for d, p in zip(plus["dense"], plus[(0.9, True)])]
    gap = 100 * statistics.fmean(gaps)
    report.target(f"CrAM+ at 90% one-shot (BN recalibrated) within {PLUS_GAP_TARGET:g} points of its dense accuracy",
                  gap <= PLUS_GAP_TARGET, f"{100 * statistics.fmean(plus[(0.9, True)]):.1f}% vs dense "
                  f"{100 * statistics.fmean(plus['dense']):.1f}%, gap {gap:.2f} points")
    over = 100 * (statistics.fmean(plus[(0.9, True)]) - statistics.fmean(base[(0.9, True)]))
    report.target(f"CrAM+ at 90% one-shot (BN recalibrated) >= SGD + {PLUS_OVER_SGD_TARGET:g} points",
                  over >= PLUS_OVER_SGD_TARGET, f"{over:+.1f} points (SGD "
                  f"{100 * statistics.fmean(base[(0.9, True)]):.1f}%)")


def bench_nm(train_data, test_data, cfg: Config, lr: float, rho: float, report: Report) -> None:
    rows, gaps = [], []
    for method in [sgd(), *CRAM_NM.values()]:
        res: dict[str, list[float]] = {}
        for seed in cfg.seeds:
            model = train(method, train_data, cfg.epochs, seed, lr, rho)
            dense = accuracy(model, test_data)
            res.setdefault("dense", []).append(dense)
            for pattern in NM_PATTERNS:
                for recal in (True, False):
                    acc = one_shot(model, train_data, test_data, None, pattern, recalibrate=recal)
                    res.setdefault((pattern, recal), []).append(acc)
                    if method is CRAM_NM["2:4"] and pattern == "2:4" and recal:
                        gaps.append(dense - acc)
        rows.append([method.label, mean_std(res["dense"])] + [mean_std(res[(p, r)]) for p in NM_PATTERNS
                                                               for r in (True, False)])
    report.table(f"Test accuracy % after N:M pruning (first convolution dense; {len(cfg.seeds)} seeds)",
                 ["method", "dense", *(f"{p} + BN recal." if r else p for p in NM_PATTERNS for r in (True, False))],
                 rows)
    gap = 100 * statistics.fmean(gaps)
    report.target(f"CrAM+ trained for 2:4 within {NM_GAP_TARGET:g} point of its dense accuracy after 2:4 pruning "
                  "(BN recalibrated)", gap <= NM_GAP_TARGET, f"gap {gap:.2f} points")


# --------------------------------------------------------------------------------------------- 4. cost


def bench_steps(cfg: Config, lr: float, rho: float, report: Report) -> None:
    """CPU time of one training step, round-robin step by step on copies of one model and the same batches."""
    (X, y), _ = load_digits_tensors(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(y), (BATCH,), generator=gen) for _ in range(cfg.warmup + cfg.steps)]
    torch.manual_seed(0)
    base = cnn()
    timed = {"SGD": sgd(), "CrAM+ (90%)": CRAM_PLUS, "CrAM+-Multi": CRAM_MULTI, "CrAM+ (2:4)": CRAM_NM["2:4"],
             "SAM": SAM}
    steps = {label: method.build(copy.deepcopy(base).train(), lr, rho, 0)[1] for label, method in timed.items()}
    times: dict[str, list[float]] = {label: [] for label in steps}
    gc.collect()
    gc.disable()
    try:
        for i, idx in enumerate(batches):
            order = list(steps)
            order = order[i % len(order):] + order[:i % len(order)]
            for label in order:
                start = time.process_time()
                steps[label](X[idx], y[idx])
                if i >= cfg.warmup:
                    times[label].append(time.process_time() - start)
    finally:
        gc.enable()
    sgd_t = statistics.fmean(times["SGD"])
    rows = [[label, f"{statistics.fmean(t) * 1e3:.3f}", f"{statistics.median(t) * 1e3:.3f}",
             f"{statistics.fmean(t) / sgd_t:.2f}x"] for label, t in times.items()]
    n_params = sum(p.numel() for p in base.parameters())
    report.table(f"CPU time of one training step ({n_params} parameters, batch {BATCH}, {cfg.steps} steps each after "
                 f"{cfg.warmup} warm-up, interleaved, 1 thread)", ["step", "ms (mean)", "ms (median)", "/ SGD"], rows)
    ratio = statistics.fmean(times["CrAM+ (90%)"]) / sgd_t
    report.target(f"a CrAM+ step <= {STEP_TARGET:g}x an SGD step", ratio <= STEP_TARGET, f"{ratio:.2f}x")


RESNET50_SHAPES = [(64, 3, 7, 7)] + [  # conv weights per bottleneck stage, then the classifier
    shape for width, blocks, inputs in ((64, 3, 64), (128, 4, 256), (256, 6, 512), (512, 3, 1024))
    for b in range(blocks) for shape in ((width, inputs if b == 0 else 4 * width, 1, 1), (width, width, 3, 3),
                                         (4 * width, width, 1, 1)) + (((4 * width, inputs, 1, 1),) if b == 0 else ())
] + [(1000, 2048)]


def _resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def _threshold_child(method: str, n_target: int, queue) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    scale = min(1.0, n_target / sum(math.prod(s) for s in RESNET50_SHAPES))
    tensors = [torch.randn(max(1, round(s[0] * scale)), *s[1:], generator=gen) for s in RESNET50_SHAPES]
    n = sum(t.numel() for t in tensors)
    k = round(0.9 * n)

    def threshold() -> float:
        if method == NAIVE:
            return float(torch.cat([t.abs().reshape(-1) for t in tensors]).kthvalue(k).values)
        return float(kth_smallest_magnitude(tensors, k, max_concat=0 if method == RADIX else n))

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak resident size (Linux >= 4.0)
    before = _resident_mib("VmRSS")
    value = threshold()
    extra = _resident_mib("VmHWM") - before   # memory from the first call, time from the second (warm)
    start = time.process_time()
    threshold()
    queue.put((n, value, time.process_time() - start, extra, max(t.numel() for t in tensors) * 4 / 2**20))


NAIVE = "torch.cat of abs(w) + kthvalue (the research code's way)"
CONCAT = "kth_smallest_magnitude, concatenating (its path up to 2^17 entries)"
RADIX = "kth_smallest_magnitude, radix select (its path above)"


def bench_threshold(cfg: Config, report: Report) -> None:
    """The exact 90% threshold over a ResNet-50-sized set of float32 weights, each method in a fresh process (so
    the peak resident memory it adds is its own)."""
    context = multiprocessing.get_context("spawn")
    rows, values = [], []
    for method in (NAIVE, CONCAT, RADIX):
        queue = context.Queue()
        child = context.Process(target=_threshold_child, args=(method, cfg.threshold_params, queue))
        child.start()
        n, value, took, extra_mib, largest_mib = queue.get()
        child.join()
        values.append(value)
        rows.append([method, f"{took:.2f}", f"{extra_mib:.0f}"])
    same = "the same threshold" if len(set(values)) == 1 else f"DIFFERENT thresholds {values}"
    report.table(f"Exact global 90% threshold over {n:,} float32 weights in {len(RESNET50_SHAPES)} tensors (ResNet-50 "
                 f"shapes, {n * 4 / 2**20:.0f} MiB, largest tensor {largest_mib:.0f} MiB; CPU time of a second call, 1 "
                 f"thread; peak resident memory added by the first, each in a fresh process): {same}",
                 ["method", "s", "MiB added"], rows)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 seed, 4 epochs, small grids")
    parser.add_argument("--sections", default="accuracy,nm,steps,threshold",
                        help="subset of accuracy,nm,steps,threshold (tuning runs before accuracy, nm and steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else Config()
    sections = args.sections.split(",")
    start = time.perf_counter()
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    report = Report()
    train_data, test_data = load_digits_tensors(0)
    if {"accuracy", "nm", "steps"} & set(sections):
        lr, rho = tune(train_data, cfg, report)
        if "accuracy" in sections:
            bench_accuracy(train_data, test_data, cfg, lr, rho, report)
        if "nm" in sections:
            bench_nm(train_data, test_data, cfg, lr, rho, report)
        if "steps" in sections:
            bench_steps(cfg, lr, rho, report)
    if "threshold" in sections:
        bench_threshold(cfg, report)
    report.print_all()
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
