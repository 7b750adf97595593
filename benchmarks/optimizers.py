"""curvkit.optim (AdaHessian, Sophia) against Adam/AdamW, torch-optimizer 0.3.0 and pytorch-optimizer 4.1.0.

Two parts, in one process, on sklearn's 8x8 digits (64-32-10 tanh MLP and a small conv net):

1. accuracy: test accuracy and loss after a fixed number of epochs (mean +- std over seeds); learning
   rates (and AdaHessian's spatial_average on the conv net) are picked on a validation split carved out
   of the training set, never on the test set, then the model is retrained on the whole training set;
   verdicts compare tuned curvkit AdaHessian with every other row, paired over seeds;
2. step time: one training step (forward, derivatives, update) of every optimizer, interleaved step by
   step on copies of the same model and the same batches, against Adam and against the "autograd floor"
   (forward + grad(create_graph=True) + one Hessian-vector product: the bare work of an AdaHessian step).

A broken anchor prints ``n/a (reason)`` instead of stopping the run.

    pip install -c constraints.txt torch-optimizer pytorch-optimizer   # the anchors
    python benchmarks/optimizers.py            # about 4.5 minutes on 2 CPU cores
    python benchmarks/optimizers.py --quick    # about 1 minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Before torch loads libgomp: spinning OpenMP workers distort timings on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# This checkout's curvkit, wherever an editable install happens to point.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from _common import Report as _Report
from _common import backward_step, digits_cnn
from torch import nn

from curvkit.datasets import load_digits_tensors
from curvkit.optim import AdaHessian, Sophia

BATCH = 64
WINDOW = 10            # step-time blocks: one curvature refresh per block at update_each=10
FLOOR_TARGET = 1.1     # curvkit AdaHessian(update_each=1) step <= 1.1x the autograd floor
LAZY_TARGET = 1.2      # curvkit AdaHessian(update_each=10) step <= 1.2x an Adam step
ANCHOR_TARGET = 0.9    # curvkit AdaHessian step <= 0.9x torch-optimizer's Adahessian at equal settings
FAILURES = (ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, RuntimeError, TypeError,
            ValueError, PackageNotFoundError)


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)   # 3 seeds cannot resolve the ~0.3-point gaps between these methods
    tune_seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    adam_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    adahessian_grid: tuple[float, ...] = (0.03, 0.05, 0.1, 0.15, 0.2)
    sophia_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    steps: int = 200
    warmup: int = 20


QUICK = Config(seeds=(0, 1), tune_seeds=(0,), epochs=5, steps=100, warmup=10)


# --------------------------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


cnn = digits_cnn


MODELS = {"MLP 64-32-10 tanh": mlp, "CNN conv8-conv16-avgpool-linear": cnn}


# --------------------------------------------------------------------------------------------- optimizers

# How a step is driven: "backward" (first order), "closure" (curvkit: the optimizer differentiates),
# "create_graph" (anchors: loss.backward(create_graph=True) then step()).
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def closure_step(model: nn.Module, opt) -> Step:
    return lambda x, y: opt.step(lambda: F.cross_entropy(model(x), y))


def create_graph_step(model: nn.Module, opt) -> Step:
    def step(x, y):
        opt.zero_grad(set_to_none=True)  # drops last step's graph-carrying .grad (a reference cycle otherwise)
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=True)
        opt.step()
        return loss.detach()
    return step


DRIVERS = {"backward": backward_step, "closure": closure_step, "create_graph": create_graph_step}


@dataclass
class Method:
    """One optimizer configuration: ``build(params, seed)`` returns the optimizer."""

    label: str
    build: Callable[..., torch.optim.Optimizer]
    drive: str

    def stepper(self, model: nn.Module, seed: int) -> Step:
        return DRIVERS[self.drive](model, self.build(list(model.parameters()), seed))


def adam(lr: float) -> Method:
    return Method(f"Adam lr={lr:g}", lambda p, s: torch.optim.Adam(p, lr=lr), "backward")


def adamw(lr: float) -> Method:
    return Method(f"AdamW lr={lr:g} (wd 0.01)", lambda p, s: torch.optim.AdamW(p, lr=lr), "backward")


def curvkit_adahessian(lr: float = 0.15, spatial_average: bool = True, update_each: int = 1, note: str = "") -> Method:
    spatial = "" if spatial_average else ", spatial_average=False"
    return Method(f"curvkit AdaHessian lr={lr:g}{spatial}{note}",
                  lambda p, s: AdaHessian(p, lr=lr, spatial_average=spatial_average, update_each=update_each, seed=s),
                  "closure")


def curvkit_sophia(lr: float, update_each: int = 10) -> Method:
    return Method(f"curvkit Sophia (hutchinson) lr={lr:g}",
                  lambda p, s: Sophia(p, lr=lr, update_each=update_each, seed=s), "closure")


def torch_optimizer_adahessian(**kw) -> Method:
    def build(params, seed):
        import torch_optimizer
        return torch_optimizer.Adahessian(params, **kw)  # no seed: it would reseed torch's global RNG
    return Method(f"torch-optimizer Adahessian {settings(kw)}", build, "create_graph")


def pytorch_optimizer(name: str, **kw) -> Method:
    def build(params, seed):
        import pytorch_optimizer
        return getattr(pytorch_optimizer, name)(params, **kw)
    return Method(f"pytorch-optimizer {name} {settings(kw)}", build, "create_graph")


def settings(kw: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()) or "(defaults)"


def sophiah_like_curvkit(lr: float, rho: float = 0.04, weight_decay: float = 0.1) -> Method:
    """pytorch-optimizer's SophiaH at curvkit Sophia's settings: its step is lr * clip(m / h, +-p), curvkit's is
    lr * clip(m / (rho h), +-1), so lr -> lr / rho, p = rho, weight_decay -> weight_decay * rho."""
    method = pytorch_optimizer("SophiaH", lr=lr / rho, p=rho, betas=(0.965, 0.99), weight_decay=weight_decay * rho,
                               hessian_distribution="rademacher")
    return replace(method, label=f"pytorch-optimizer SophiaH at curvkit's settings (lr={lr:g}/rho, p=rho={rho:g}, "
                                 f"betas, wd, rademacher)")


# --------------------------------------------------------------------------------------------- helpers


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"n/a ({type(err).__name__}: {text[:80]})"


def anchor_versions() -> str:
    found = []
    for dist in ("torch-optimizer", "pytorch-optimizer"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def mean_std(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    if not values:
        return "n/a"
    vals = [v * scale for v in values]
    if any(math.isnan(v) for v in vals):
        return "diverged" if all(math.isnan(v) for v in vals) else f"{sum(math.isnan(v) for v in vals)} diverged"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


class Report(_Report):
    """The shared report, with targets given as a value and the limit it must not exceed."""

    def target(self, text: str, value: float, limit: float) -> None:
        met = "met" if value <= limit else "NOT MET"
        verdict = "n/a (a step failed)" if math.isnan(value) else f"{value:.2f} **{met}**"
        self.targets.append(f"- {text} <= {limit:g}: {verdict}")


# --------------------------------------------------------------------------------------------- 1. accuracy


def train(factory: Callable[[], nn.Module], method: Method, data, epochs: int, seed: int) -> nn.Module | None:
    """``epochs`` of mini-batch training; None if the loss stopped being finite."""
    torch.manual_seed(seed)
    model = factory()
    step = method.stepper(model, seed)
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            if not torch.isfinite(step(X[idx], y[idx])):
                return None
    return model


@torch.no_grad()
def evaluate(model: nn.Module | None, data) -> tuple[float, float]:
    if model is None:
        return math.nan, math.nan
    logits = model(data[0])
    loss = F.cross_entropy(logits, data[1]).item()
    if not math.isfinite(loss):
        return math.nan, math.nan
    return (logits.argmax(1) == data[1]).float().mean().item(), loss


@dataclass
class Outcome:
    acc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    error: str | None = None


def run_method(factory, method: Method, train_data, eval_data, epochs: int, seeds: tuple[int, ...]) -> Outcome:
    out = Outcome()
    try:
        for seed in seeds:
            acc, loss = evaluate(train(factory, method, train_data, epochs, seed), eval_data)
            out.acc.append(acc)
            out.loss.append(loss)
    except FAILURES as err:  # a broken anchor is reported, not fatal
        out.error = reason(err)
    return out


def score(out: Outcome) -> tuple[float, float]:
    """Validation ranking: mean accuracy, then mean loss (a diverged run ranks last)."""
    if out.error or any(math.isnan(a) for a in out.acc):
        return (-math.inf, math.inf)
    return (statistics.fmean(out.acc), statistics.fmean(out.loss))


def tune(name: str, factory, train_data, cfg: Config, report: Report) -> dict[str, tuple]:
    """Pick each tuned method's settings on the last 20% of the training set (the rest trains): the lr, and for
    AdaHessian on a model with conv weights also ``spatial_average`` (True first: it wins ties)."""
    cut = int(0.8 * len(train_data[1]))
    fit, val = (train_data[0][:cut], train_data[1][:cut]), (train_data[0][cut:], train_data[1][cut:])
    spatial = (True, False) if any(p.dim() >= 3 for p in factory().parameters()) else (True,)
    grids = {"Adam": (adam, [(lr,) for lr in cfg.adam_grid]), "AdamW": (adamw, [(lr,) for lr in cfg.adam_grid]),
             "curvkit AdaHessian": (curvkit_adahessian, [(lr, sa) for sa in spatial for lr in cfg.adahessian_grid]),
             "curvkit Sophia": (curvkit_sophia, [(lr,) for lr in cfg.sophia_grid])}
    chosen, rows = {}, []
    for key, (make, grid) in grids.items():
        outs = [run_method(factory, make(*setting), fit, val, cfg.epochs, cfg.tune_seeds) for setting in grid]
        best = max(range(len(grid)), key=lambda i: (score(outs[i])[0], -score(outs[i])[1]))
        chosen[key] = grid[best]
        cells = [o.error or f"{mean_std(o.acc, 1, 100)}% / {mean_std(o.loss, 3)}" for o in outs]
        rows.append([key, " · ".join(f"{describe(setting)}: {c}" for setting, c in zip(grid, cells)),
                     f"**{describe(grid[best])}**"])
    report.table(f"{name}: settings on validation ({len(fit[1])} fit / {len(val[1])} validation samples "
                 f"from TRAIN, {cfg.epochs} epochs, seed(s) {', '.join(map(str, cfg.tune_seeds))}; accuracy / loss)",
                 ["optimizer", "setting: val. accuracy / val. loss", "chosen"], rows)
    return chosen


def describe(setting: tuple) -> str:
    """``(lr,)`` as "0.1", ``(lr, spatial_average)`` as "0.1" or "0.1 no-spatial"."""
    return f"{setting[0]:g}" + ("" if len(setting) == 1 or setting[1] else " no-spatial")


def accuracy_methods(chosen: dict[str, tuple]) -> list[Method]:
    ah, spatial = chosen["curvkit AdaHessian"]
    sophia_lr = chosen["curvkit Sophia"][0]
    methods = [adam(*chosen["Adam"]), adamw(*chosen["AdamW"])]
    if (ah, spatial) != (0.15, True):
        methods.append(curvkit_adahessian(0.15, note=" (default)"))
    methods += [
        curvkit_adahessian(ah, spatial, note=" (tuned)"),
        curvkit_sophia(sophia_lr),
        torch_optimizer_adahessian(),
        torch_optimizer_adahessian(lr=ah, hessian_power=1.0),
        pytorch_optimizer("AdaHessian"),
        pytorch_optimizer("AdaHessian", lr=ah),
        pytorch_optimizer("AdaHessian", lr=ah, eps=1e-4),
        pytorch_optimizer("SophiaH"),
        pytorch_optimizer("SophiaH", lr=sophia_lr),  # literally the same lr: 25-100x smaller steps
        sophiah_like_curvkit(sophia_lr),
    ]
    return methods


def paired_gap(ours: Outcome, theirs: Outcome) -> tuple[float, float]:
    """Mean and standard error of ours - theirs over seeds (paired: a seed fixes init and batch order)."""
    gaps = [a - b for a, b in zip(ours.acc, theirs.acc)]
    return statistics.fmean(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else math.nan


def bench_accuracy(name: str, factory, cfg: Config, report: Report) -> None:
    train_data, test_data = load_digits_tensors(0)
    chosen = tune(name, factory, train_data, cfg, report)
    rows, outcomes = [], {}
    for method in accuracy_methods(chosen):
        out = outcomes[method.label] = run_method(factory, method, train_data, test_data, cfg.epochs, cfg.seeds)
        cells = [out.error, ""] if out.error else [f"{mean_std(out.acc, 1, 100)}%", mean_std(out.loss, 3)]
        rows.append([method.label, *cells])
    report.table(f"{name}: test accuracy and loss after {cfg.epochs} epochs on all {len(train_data[1])} training "
                 f"samples (batch {BATCH}, {len(test_data[1])} test samples, mean ± std over seeds "
                 f"{', '.join(map(str, cfg.seeds))})", ["optimizer", "test accuracy", "test loss"], rows)
    ours = outcomes[curvkit_adahessian(*chosen["curvkit AdaHessian"], note=" (tuned)").label]
    for label, theirs in outcomes.items():
        if label.startswith("curvkit") or theirs.error or ours.error or any(map(math.isnan, ours.acc + theirs.acc)):
            continue
        gap, se = paired_gap(ours, theirs)
        verdict = "met" if gap >= 0 else "not met, within 2 standard errors" if gap > -2 * se else "NOT MET"
        report.note(f"- {name}: accuracy of curvkit AdaHessian (tuned) - {label}: {100 * gap:+.2f} ± {100 * se:.2f} "
                     f"points (paired over {len(ours.acc)} seeds) **{verdict}**")


# --------------------------------------------------------------------------------------------- 2. step time


def floor_step(model: nn.Module, seed: int) -> Step:
    """The bare autograd work of an AdaHessian step: forward, grad(create_graph=True), one HVP (z fixed)."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randint(0, 2, p.shape, generator=gen).float().mul_(2).sub_(1) for p in params]

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        torch.autograd.grad(grads, params, zs)
        return loss.detach()
    return step


TIMED = {
    "Adam": adam(1e-3),
    "autograd floor (grad + 1 HVP)": None,
    "curvkit AdaHessian update_each=1": curvkit_adahessian(),
    "curvkit AdaHessian update_each=10": curvkit_adahessian(update_each=10),
    "curvkit Sophia update_each=10": curvkit_sophia(1e-2),
    "torch-optimizer Adahessian hessian_power=1": torch_optimizer_adahessian(hessian_power=1.0),
    "pytorch-optimizer AdaHessian eps=1e-4": pytorch_optimizer("AdaHessian", lr=0.15, eps=1e-4),
}


def windowed_mean(times: list[float]) -> float:
    """Median over consecutive WINDOW-step blocks of the block's mean step time: a mean (each block holds
    exactly one curvature refresh of an update_each=10 optimizer) that ignores blocks hit by other load."""
    blocks = [statistics.fmean(times[i:i + WINDOW]) for i in range(0, len(times) - WINDOW + 1, WINDOW)]
    return statistics.median(blocks) if blocks else math.nan


def bench_steps(name: str, factory, cfg: Config, report: Report) -> None:
    """Mean time of one full step per optimizer, round-robin step by step (order rotated every round)."""
    torch.manual_seed(0)
    base = factory()
    (X, y), _ = load_digits_tensors(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(y), (BATCH,), generator=gen) for _ in range(cfg.warmup + cfg.steps)]
    steps, errors = {}, {}
    for label, method in TIMED.items():
        model = copy.deepcopy(base)
        try:
            steps[label] = floor_step(model, 0) if method is None else method.stepper(model, 0)
        except FAILURES as err:
            errors[label] = reason(err)
    times: dict[str, list[float]] = {label: [] for label in steps}
    gc.collect()
    gc.disable()
    try:
        for i, idx in enumerate(batches):
            x, t = X[idx], y[idx]
            order = list(steps)
            order = order[i % len(order):] + order[:i % len(order)]
            for label in order:
                try:
                    start = time.perf_counter()
                    steps[label](x, t)
                    took = time.perf_counter() - start
                except FAILURES as err:
                    errors[label] = reason(err)
                    del steps[label]
                    continue
                if i >= cfg.warmup:
                    times[label].append(took)
            if i % 20 == 19:
                gc.collect()
    finally:
        gc.enable()
    robust = {label: math.nan if label in errors else windowed_mean(times[label]) for label in TIMED}
    adam_t, floor_t = robust["Adam"], robust["autograd floor (grad + 1 HVP)"]
    rows = []
    for label in TIMED:
        if label in errors:
            rows.append([label, errors[label], "", "", ""])
            continue
        rows.append([label, f"{robust[label] * 1e3:.3f}", f"{statistics.fmean(times[label]) * 1e3:.3f}",
                     f"{robust[label] / adam_t:.2f}x", f"{robust[label] / floor_t:.2f}x"])
    n_params = sum(p.numel() for p in base.parameters())
    report.table(f"{name}: time of one training step ({n_params} parameters, batch {BATCH}, {cfg.steps} steps each "
                 f"after {cfg.warmup} warm-up, interleaved)",
                 ["step", f"ms / step (median of {WINDOW}-step means)", "ms / step (plain mean)", "/ Adam",
                  "/ floor"], rows)
    ah1, ah10 = robust["curvkit AdaHessian update_each=1"], robust["curvkit AdaHessian update_each=10"]
    report.target(f"{name}: curvkit AdaHessian(update_each=1) / autograd floor", ah1 / floor_t, FLOOR_TARGET)
    report.target(f"{name}: curvkit AdaHessian(update_each=10) / Adam", ah10 / adam_t, LAZY_TARGET)
    report.target(f"{name}: curvkit AdaHessian / torch-optimizer Adahessian (both hessian_power=1, lr 0.15, eps 1e-4)",
                  ah1 / robust["torch-optimizer Adahessian hessian_power=1"], ANCHOR_TARGET)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 1 minute: 1 seed, 5 epochs, 100 timed steps")
    parser.add_argument("--sections", default="accuracy,steps", help="subset of accuracy,steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # the anchors' create_graph reference-cycle warning
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Config()
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{anchor_versions()}, load average {os.getloadavg()[0]:.1f}")
    report = Report()
    sections = args.sections.split(",")
    for name, factory in MODELS.items():
        if "accuracy" in sections:
            bench_accuracy(name, factory, cfg, report)
        if "steps" in sections:
            bench_steps(name, factory, cfg, report)
    report.print_all()
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
