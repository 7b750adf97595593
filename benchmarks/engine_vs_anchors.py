"""curvkit.hessian against its anchors: PyHessian 0.1, curvlinops 3.0.1 and hessian-eigenthings 1.0.0a5.

Everything runs in one process on the same float32 model and the same batch, and every ratio is
curvkit / anchor from measurements interleaved round-robin. Times are this process's CPU time by default
(``--clock wall`` for elapsed time), so other jobs on a shared machine do not skew the ratios:

1. one Hessian-vector product (median over repetitions),
2. top-1 and top-5 eigenvalues: products, time, relative error against dense ``eigvalsh``,
3. trace at an equal budget of products: relative RMSE over seeds against the exact trace,
4. SLQ spectral density: time at equal 1-Wasserstein distance to the exact eigenvalue distribution.

A broken anchor prints ``n/a (reason)`` instead of stopping the run.

    python benchmarks/engine_vs_anchors.py            # 2-4 minutes on 2 busy CPU cores
    python benchmarks/engine_vs_anchors.py --quick    # under a minute (MLP only, fewer repetitions)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads libgomp (it reads this once): under CPU contention, spinning OpenMP workers wait
# for a descheduled peer at every parallel region, which inflates every library's products alike and
# pushes all ratios to 1 (BENCHMARKS.md has the figures). Threads stay at torch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# This checkout's curvkit, wherever an editable install happens to point.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from _common import adam_pretrain
from scipy.sparse.linalg import eigsh
from scipy.stats import wasserstein_distance
from torch import nn

from curvkit.datasets import load_digits_tensors
from curvkit.hessian import HessianOperator, density, eigenvalues, trace

EIG_TOL = 1e-6
HUTCH_PP_BUDGET = 99  # Hutch++ implementations want a multiple of 3
HVP_TARGET = 1.05     # curvkit HVP <= 1.05x PyHessian's cached-graph HVP
SLQ_TARGET = 0.5      # curvkit SLQ <= 0.5x the fastest anchor's time at equal accuracy
ANCHORS = ("PyHessian", "curvlinops", "eigenthings")
# What a broken or incompatible library raises; it is reported as "n/a (reason)" instead of ending the run.
FAILURES = (ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, RuntimeError, TypeError,
            ValueError)


@dataclass(frozen=True)
class Config:
    sections: tuple[str, ...] = ("hvp", "eigen", "trace", "slq")
    hvp_reps: int = 40
    eig_reps: int = 3
    trace_budget: int = 100
    trace_seeds: int = 10
    slq_budgets: tuple[tuple[int, int], ...] = ((2, 20), (4, 40), (8, 60), (10, 80))
    slq_seeds: int = 2


FULL = Config()
QUICK = Config(hvp_reps=15, eig_reps=1, trace_seeds=4, slq_budgets=((2, 20), (5, 50)), slq_seeds=1)
# The conv net's products cost ~20x the MLP's: trace (model-independent statistics) is left to the MLP.
RESNET = Config(sections=("hvp", "eigen", "slq"), hvp_reps=20, eig_reps=1, slq_budgets=((2, 20), (4, 40)),
                slq_seeds=1)


# --------------------------------------------------------------------------------------------- problems


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def resnet(channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        ResBlock(channels), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 4 * 4, 10),
    )


@dataclass
class Problem:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss: nn.Module
    dense: torch.Tensor = field(repr=False)   # exact Hessian (float64 copy of the float32 weights)
    spectrum: np.ndarray = field(repr=False)  # its eigenvalues, ascending

    @property
    def n(self) -> int:
        return self.dense.shape[0]


def dense_hessian(model: nn.Module, loss: nn.Module, batch, chunk: int = 128) -> torch.Tensor:
    """The exact Hessian in float64, column blocks of vmapped forward-over-reverse products."""
    model64 = copy.deepcopy(model).double().eval()
    names, params = zip(*model64.named_parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    x, y = batch[0].double(), batch[1]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = {k: c.view(s) for k, c, s in zip(names, flat.split(sizes), shapes)}
        return loss(torch.func.functional_call(model64, tensors, (x,)), y)

    grad = torch.func.grad(loss_of)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (theta,), (v,))[1]

    eye = torch.eye(theta.numel(), dtype=torch.float64)
    H = torch.cat([torch.vmap(hvp)(eye[i:i + chunk]) for i in range(0, len(eye), chunk)])
    return (H + H.T) / 2


def make_problem(name: str, factory: Callable[[], nn.Module], epochs: int, batch_size: int = 512) -> Problem:
    torch.manual_seed(0)
    (X, y), _ = load_digits_tensors(seed=0)
    model = adam_pretrain(factory(), (X, y), epochs)
    for p in model.parameters():
        p.grad = None
    batch = (X[:batch_size], y[:batch_size])
    loss = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss, batch)
    return Problem(name, model, batch, loss, H, torch.linalg.eigvalsh(H).numpy())


# --------------------------------------------------------------------------------------------- libraries


class Counter:
    """Counts products by wrapping the one function a library calls for each of them."""

    def __init__(self):
        self.count = 0

    def wrap(self, fn: Callable, columns: Callable[..., int] = lambda *a: 1) -> Callable:
        def counted(*args):
            self.count += columns(*args)
            return fn(*args)

        return counted


@dataclass
class Lib:
    """One library's operator on the problem, with its product count."""

    name: str
    op: Any
    products: Callable[[], int]
    hvp_on: Callable[[torch.Tensor], Callable[[], Any]]  # v -> a zero-argument product in the native format


def make_curvkit(pb: Problem) -> Lib:
    H = HessianOperator(pb.model, pb.loss, pb.batch)
    return Lib("curvkit", H, lambda: H.matvecs, lambda v: lambda: H @ v)


def make_pyhessian(pb: Problem) -> Lib:
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    pb.model.zero_grad(set_to_none=True)  # the constructor accumulates into .grad
    hc = hessian(pb.model, pb.loss, data=pb.batch, cuda=False)
    pb.model.zero_grad(set_to_none=True)  # hc.gradsH keeps the graph; leave the model clean
    counter = Counter()
    module = sys.modules["pyhessian.hessian"]  # `pyhessian.hessian` the attribute is the class
    module.hessian_vector_product = counter.wrap(hessian_vector_product)
    sizes = [p.numel() for p in hc.params]

    def hvp_on(v: torch.Tensor) -> Callable[[], Any]:
        vs = [c.view_as(p).clone() for c, p in zip(v.split(sizes), hc.params)]  # PyHessian's vectors are lists
        return lambda: hessian_vector_product(hc.gradsH, hc.params, vs)

    return Lib("PyHessian", hc, lambda: counter.count, hvp_on)


def make_curvlinops(pb: Problem) -> Lib:
    from curvlinops import HessianLinearOperator

    params = [p for p in pb.model.parameters() if p.requires_grad]
    H = HessianLinearOperator(pb.model, pb.loss, params, [pb.batch], check_deterministic=False,
                              num_data=len(pb.batch[1]))
    counter = Counter()
    H._matmat = counter.wrap(H._matmat, lambda X: X[0].shape[-1])  # list format, columns last
    return Lib("curvlinops", H, lambda: counter.count, lambda v: lambda: H @ v)


def make_eigenthings(pb: Problem) -> Lib:
    from hessian_eigenthings import HessianOperator as EigenthingsHessian
    from hessian_eigenthings import supervised_loss

    H = EigenthingsHessian(pb.model, [pb.batch], supervised_loss(pb.loss))
    counter = Counter()
    H.matvec = counter.wrap(H.matvec)
    return Lib("eigenthings", H, lambda: counter.count, lambda v: lambda: H.matvec(v))


FACTORIES = {"curvkit": make_curvkit, "PyHessian": make_pyhessian, "curvlinops": make_curvlinops,
             "eigenthings": make_eigenthings}


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"n/a ({type(err).__name__}: {text[:90]})"


def build_libs(pb: Problem) -> tuple[dict[str, Lib], dict[str, str]]:
    libs, broken = {}, {}
    for name, factory in FACTORIES.items():
        try:
            libs[name] = factory(pb)
        except FAILURES as err:  # an anchor that cannot even be built is reported, not fatal
            broken[name] = reason(err)
    return libs, broken


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Bench:
    """What every section gets: the problem, the libraries that could be built, those that could not."""

    pb: Problem
    libs: dict[str, Lib]
    broken: dict[str, str]
    cfg: Config
    report: Report

    clock: str = "cpu"  # "cpu": this process's CPU time, immune to other processes; "wall": elapsed time

    @property
    def time_header(self) -> str:
        return f"{self.clock} time"

    def now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    def measure(self, runs: list[Run], seeds: list[int], warmup: int = 0) -> list[Run]:
        """Call every run once per seed, round-robin across runs; a run that raises is marked n/a."""
        for run in runs:
            for _ in range(warmup):
                try:
                    run.fn(seeds[0])
                except FAILURES as err:
                    run.error = reason(err)
        for seed in seeds:
            for run in runs:
                if run.error is not None:
                    continue
                lib = self.libs[run.lib]
                before = lib.products()
                try:
                    start = self.now()
                    out = run.fn(seed)
                    run.times.append(self.now() - start)
                except FAILURES as err:
                    run.error = reason(err)
                    continue
                run.products.append(lib.products() - before)
                run.results.append(out)
        return runs

    def table(self, title: str, header: list[str], rows: list[list[str]], lib_column: int = 0) -> None:
        """A report table with an ``n/a (reason)`` row for every library that could not be built."""
        blank = [""] * (len(header) - lib_column - 2)
        rows = rows + [[""] * lib_column + [name, why, *blank] for name, why in self.broken.items()]
        self.report.table(title, header, rows)


@dataclass
class Run:
    """One measured configuration: a label, the library, and a callable(seed) -> result."""

    lib: str
    label: str
    fn: Callable[[int], Any]
    results: list = field(default_factory=list)
    products: list = field(default_factory=list)
    times: list = field(default_factory=list)
    error: str | None = None

    @property
    def time(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def mean_products(self) -> float:
        return float(np.mean(self.products)) if self.products else math.nan


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.3g} ms"


class Report:
    """Markdown tables collected during the run and printed together at the end."""

    def __init__(self, clock: str):
        self.clock = clock
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []
        self.targets: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        self.tables.append((title, header, rows))
        print(self.render(title, header, rows), flush=True)

    @staticmethod
    def render(title: str, header: list[str], rows: list[list[str]]) -> str:
        lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)

    def target(self, text: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("met" if met else "NOT MET")
        self.targets.append(f"- {text}: **{verdict}**")

    def print_all(self) -> None:
        print(f"\n\n## Summary (curvkit / anchor ratios of {self.clock} time; < 1 means curvkit is faster)")
        for title, header, rows in self.tables:
            print(self.render(title, header, rows))
        print("\n### Targets\n")
        print("\n".join(self.targets))


def ratio(a: float, b: float) -> str:
    return "n/a" if not (a > 0 and b > 0) else f"{a / b:.2f}x"


# --------------------------------------------------------------------------------------------- 1. HVP


def product_run(lib: str, product: Callable[[], Any]) -> Run:
    return Run(lib, "H @ v", lambda _: product())


def python_work(H: HessianOperator, v: torch.Tensor, number: int = 1000) -> float:
    """CPU seconds of curvkit's own work per ``H @ v``: autograd.grad hands back a saved result instead of running.

    The least of 5 repetitions of ``number`` products (garbage collection left on, as in the products).
    """
    grad = torch.autograd.grad
    saved = grad(H._single_state().gradient, H._single_state().leaves, v.to(H.dtype), retain_graph=True,
                 allow_unused=True)
    torch.autograd.grad = lambda *args, **kwargs: saved
    try:
        best = math.inf
        for _ in range(5):
            start = time.process_time()
            for _ in range(number):
                H @ v
            best = min(best, (time.process_time() - start) / number)
        return best
    finally:
        torch.autograd.grad = grad


def bench_hvp(bench: Bench) -> None:
    pb, libs, cfg, report = bench.pb, bench.libs, bench.cfg, bench.report
    v = torch.randn(pb.n, generator=torch.Generator().manual_seed(0))
    exact = pb.dense @ v.double()
    runs = [product_run(name, lib.hvp_on(v)) for name, lib in libs.items()]
    bench.measure(runs, list(range(cfg.hvp_reps)), warmup=3)
    ck = next((r for r in runs if r.lib == "curvkit" and not r.error), None)
    rows = []
    for run in runs:
        if run.error:
            rows.append([run.lib, run.error, "", ""])
            continue
        out = run.results[0]
        flat = torch.cat([t.reshape(-1) for t in out]) if isinstance(out, (list, tuple)) else out
        err = float((flat.double() - exact).norm() / exact.norm())
        rows.append([run.lib, ms(run.time), fmt(err, 2), ratio(ck.time, run.time) if ck else "n/a"])
    bench.table(f"{pb.name}: one Hessian-vector product (n={pb.n}, batch {len(pb.batch[1])}, median of "
                f"{cfg.hvp_reps})",
                ["library", f"{bench.time_header} / product", "rel. error vs dense", "curvkit / this"], rows)
    ph = next((r for r in runs if r.lib == "PyHessian" and not r.error), None)
    both = ck is not None and ph is not None
    own = f"; curvkit's Python work around autograd.grad {python_work(libs['curvkit'].op, v) * 1e6:.0f} us" \
        if ck else ""
    report.target(f"{pb.name}: curvkit HVP <= {HVP_TARGET}x PyHessian's cached-graph HVP "
                  f"({ratio(ck.time, ph.time) if both else 'n/a'}{own})",
                  ck.time <= HVP_TARGET * ph.time if both else None)


# --------------------------------------------------------------------------------------------- 2. eigenvalues


def reference_top(spectrum: np.ndarray, k: int, magnitude: bool) -> np.ndarray:
    order = np.argsort(-np.abs(spectrum)) if magnitude else np.argsort(-spectrum)
    return spectrum[order[:k]]


def top_error(values, spectrum: np.ndarray, k: int, magnitude: bool = False) -> float:
    """Largest relative error of the k returned values against the exact top-k (by value or magnitude)."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    vals = vals[np.argsort(-np.abs(vals) if magnitude else -vals)][:k]
    ref = reference_top(spectrum, k, magnitude)
    if vals.size < k:
        return math.inf
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def curvkit_eig(H, k: int, tol: float = EIG_TOL) -> Run:
    return Run("curvkit", f"eigenvalues(tol={tol:g})",
               lambda s: eigenvalues(H, k=k, which="LA", tol=tol, seed=s).values.numpy())


def pyhessian_eig(hc, k: int, max_iter: int, tol: float, label: str) -> Run:
    def fn(seed: int):
        torch.manual_seed(seed)
        return hc.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)[0]

    return Run("PyHessian", label, fn)


def curvlinops_eig(H, k: int) -> Run:
    Hs = H.to_scipy()

    def fn(seed: int):
        v0 = np.random.default_rng(seed).standard_normal(Hs.shape[0])
        return eigsh(Hs, k=k, which="LA", tol=EIG_TOL, v0=v0, return_eigenvectors=False)

    return Run("curvlinops", f"eigsh(tol={EIG_TOL:g})", fn)


def eigenthings_eig(H, k: int, steps: int) -> Run:
    from hessian_eigenthings import lanczos

    return Run("eigenthings", f"lanczos(max_iter={steps})",
               lambda s: lanczos(H, k=k, max_iter=steps, which="LA", seed=s).eigenvalues.numpy())


def eig_runs(libs: dict[str, Lib], k: int, lanczos_steps: int | None) -> list[Run]:
    runs = []
    if "curvkit" in libs:
        runs.append(curvkit_eig(libs["curvkit"].op, k))
        runs.append(curvkit_eig(libs["curvkit"].op, k, tol=1e-3))  # PyHessian's default tolerance
    if "PyHessian" in libs:
        hc = libs["PyHessian"].op
        runs.append(pyhessian_eig(hc, k, 100, 1e-3, "defaults (maxIter=100, tol=1e-3)"))
        runs.append(pyhessian_eig(hc, k, 1000, EIG_TOL, f"maxIter=1000, tol={EIG_TOL:g}"))
    if "curvlinops" in libs:
        runs.append(curvlinops_eig(libs["curvlinops"].op, k))
    if "eigenthings" in libs and lanczos_steps:
        runs.append(eigenthings_eig(libs["eigenthings"].op, k, lanczos_steps))
    return runs


def calibrate_lanczos(pb: Problem, libs: dict[str, Lib], k: int, target: float) -> tuple[int | None, str]:
    """Smallest hessian-eigenthings ``max_iter`` whose top-k error reaches ``target`` (its default is 2k)."""
    if "eigenthings" not in libs:
        return None, ""
    from hessian_eigenthings import lanczos

    He = libs["eigenthings"].op
    tried = []
    for steps in sorted({2 * k, 10, 15, 20, 30, 40, 50, 60, 80, 100, 150, 200} - set(range(2 * k))):
        err = top_error(lanczos(He, k=k, max_iter=steps, which="LA", seed=0).eigenvalues, pb.spectrum, k)
        tried.append(f"{steps}:{err:.1e}")
        if err <= target:
            return steps, " ".join(tried)
    return steps, " ".join(tried) + " (target not reached)"


def bench_eigen(bench: Bench) -> None:
    pb, libs, cfg = bench.pb, bench.libs, bench.cfg
    for k in (1, 5):
        ck_err = EIG_TOL
        if "curvkit" in libs:
            values = eigenvalues(libs["curvkit"].op, k=k, which="LA", tol=EIG_TOL, seed=0).values
            ck_err = max(top_error(values.numpy(), pb.spectrum, k), EIG_TOL)
        steps, tried = calibrate_lanczos(pb, libs, k, ck_err)
        runs = bench.measure(eig_runs(libs, k, steps), list(range(cfg.eig_reps)))
        ck = next((r for r in runs if r.lib == "curvkit" and not r.error), None)
        rows = []
        for run in runs:
            if run.error:
                rows.append([run.lib, run.label, run.error, "", "", ""])
                continue
            errs = [top_error(v, pb.spectrum, k, magnitude=run.lib == "PyHessian") for v in run.results]
            rows.append([run.lib, run.label, fmt(run.mean_products), ms(run.time), f"{max(errs):.1e}",
                         ratio(ck.time, run.time) if ck else "n/a"])
        top = np.round(reference_top(pb.spectrum, k, False), 4)
        bench.table(f"{pb.name}: top-{k} eigenvalues (exact: {top}; time: median of {cfg.eig_reps} seeds, "
                    "error: worst seed)",
                    ["library", "method", "products", bench.time_header, "max rel. error", "curvkit / this"], rows)
        if tried:
            print(f"  hessian-eigenthings max_iter calibration (steps:error, target {ck_err:.1e}): {tried}")
    lm = reference_top(pb.spectrum, 5, True)
    if not np.allclose(np.sort(lm), np.sort(reference_top(pb.spectrum, 5, False))):
        print(f"  note: PyHessian finds largest-|lambda| eigenvalues {lm}; its errors are measured against those")


# --------------------------------------------------------------------------------------------- 3. trace


def curvkit_trace(H, method: str, budget: int) -> Run:
    return Run("curvkit", f'trace("{method}", max_matvecs={budget})',
               lambda s: trace(H, rtol=1e-12, max_matvecs=budget, method=method, seed=s).estimate)


def pyhessian_trace(hc, max_iter: int, tol: float, label: str) -> Run:
    def fn(seed: int) -> float:
        torch.manual_seed(seed)
        return float(np.mean(hc.trace(maxIter=max_iter, tol=tol)))

    return Run("PyHessian", label, fn)


def curvlinops_trace(H, estimator: Callable, budget: int) -> Run:
    def fn(seed: int) -> float:
        torch.manual_seed(seed)
        return float(estimator(H, num_matvecs=budget))

    return Run("curvlinops", f"{estimator.__name__}(num_matvecs={budget})", fn)


def eigenthings_trace(H, method: str, budget: int) -> Run:
    from hessian_eigenthings import trace as estimate

    return Run("eigenthings", f'trace("{method}", num_matvecs={budget})',
               lambda s: float(estimate(H, num_matvecs=budget, method=method, seed=s).estimate))


def trace_runs(libs: dict[str, Lib], budget: int) -> list[Run]:
    runs = []
    if "curvkit" in libs:
        H = libs["curvkit"].op
        runs += [curvkit_trace(H, m, budget) for m in ("auto", "hutchinson", "xtrace")]
        runs.append(curvkit_trace(H, "hutch++", HUTCH_PP_BUDGET))
    if "PyHessian" in libs:
        hc = libs["PyHessian"].op
        runs.append(pyhessian_trace(hc, budget, 0.0, f"trace(maxIter={budget}, tol=0)"))
        runs.append(pyhessian_trace(hc, 100, 1e-3, "trace() defaults (maxIter=100, tol=1e-3)"))
    if "curvlinops" in libs:
        from curvlinops import hutchinson_trace, hutchpp_trace, xtrace

        H = libs["curvlinops"].op
        runs += [curvlinops_trace(H, hutchinson_trace, budget), curvlinops_trace(H, xtrace, budget - budget % 2),
                 curvlinops_trace(H, hutchpp_trace, HUTCH_PP_BUDGET)]
    if "eigenthings" in libs:
        H = libs["eigenthings"].op
        runs += [eigenthings_trace(H, "hutchinson", budget), eigenthings_trace(H, "hutch++", HUTCH_PP_BUDGET)]
    return runs


def bench_trace(bench: Bench) -> None:
    pb, libs, cfg = bench.pb, bench.libs, bench.cfg
    exact = float(pb.dense.trace())
    runs = bench.measure(trace_runs(libs, cfg.trace_budget), list(range(cfg.trace_seeds)))
    ck = next((r for r in runs if r.lib == "curvkit" and not r.error), None)
    rows = []
    for run in runs:
        if run.error:
            rows.append([run.lib, run.label, run.error, "", "", ""])
            continue
        rmse = math.sqrt(np.mean((np.asarray(run.results) - exact) ** 2)) / abs(exact)
        rows.append([run.lib, run.label, fmt(run.mean_products), f"{rmse:.3f}", ms(run.time),
                     ratio(ck.time, run.time) if ck else "n/a"])
    bench.table(f"{pb.name}: trace at an equal budget (exact {exact:.4g}; {cfg.trace_seeds} seeds)",
                ["library", "method", "products", "rel. RMSE", bench.time_header, "curvkit auto / this"], rows)


# --------------------------------------------------------------------------------------------- 4. SLQ


def w1(nodes, weights, spectrum: np.ndarray) -> float:
    """1-Wasserstein distance between a weighted measure and the uniform measure on the exact spectrum."""
    nodes, weights = np.asarray(nodes, dtype=np.float64).ravel(), np.asarray(weights, dtype=np.float64).ravel()
    keep = np.isfinite(nodes) & (weights > 0)
    return float(wasserstein_distance(nodes[keep], spectrum, weights[keep] / weights[keep].sum()))


@contextlib.contextmanager
def torch_eig_shim():
    """PyHessian's density calls ``torch.eig``, removed in torch 1.9+; T is symmetric tridiagonal."""
    def eig(T, eigenvectors=False):
        values, vectors = torch.linalg.eigh(T)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    saved = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        yield
    finally:
        if saved is None:
            del torch.eig
        else:
            torch.eig = saved


def curvkit_slq(H, probes: int, steps: int):
    def fn(seed: int):
        spec = density(H, n_probes=probes, n_iter=steps, seed=seed)
        return spec.nodes, spec.weights

    return Run("curvkit", "density", fn)


def pyhessian_slq(hc, probes: int, steps: int):
    def fn(seed: int):
        torch.manual_seed(seed)
        with torch_eig_shim():
            nodes, weights = hc.density(iter=steps, n_v=probes)
        return np.concatenate(nodes), np.concatenate(weights) / probes

    return Run("PyHessian", "density (torch.eig shim)", fn)


def curvlinops_slq(H, probes: int, steps: int):
    from curvlinops import lanczos_approximate_spectrum

    def fn(seed: int):
        torch.manual_seed(seed)
        grid, dens = lanczos_approximate_spectrum(H, ncv=steps, num_repeats=probes)
        return grid.numpy(), dens.clamp_min(0).numpy()  # a gridded density: grid points weighted by it

    return Run("curvlinops", "lanczos_approximate_spectrum", fn)


def eigenthings_slq(H, probes: int, steps: int):
    from hessian_eigenthings import spectral_density

    def fn(seed: int):
        sd = spectral_density(H, num_runs=probes, lanczos_steps=steps, seed=seed)
        return sd.raw_eigenvalues.numpy(), sd.raw_weights.numpy()

    return Run("eigenthings", "spectral_density", fn)


SLQ = {"curvkit": curvkit_slq, "PyHessian": pyhessian_slq, "curvlinops": curvlinops_slq,
       "eigenthings": eigenthings_slq}


def slq_runs(libs: dict[str, Lib], probes: int, steps: int) -> list[Run]:
    """Each run returns the quadrature measure (nodes, weights); curvlinops returns (grid, density)."""
    return [make(libs[name].op, probes, steps) for name, make in SLQ.items() if name in libs]


@dataclass
class Curve:
    """One library's SLQ sweep: budget (probes x steps), median time and mean W1 per budget point.

    Power laws fitted in log-log, W1 ~ budget^a and time ~ budget^b, smooth the seed noise so two
    libraries can be compared at the same accuracy rather than at the same budget.
    """

    budgets: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    w1s: list[float] = field(default_factory=list)

    def _fit(self, ys: list[float]) -> tuple[float, float]:
        slope, intercept = np.polyfit(np.log(self.budgets), np.log(ys), 1)
        return float(slope), float(intercept)

    def w1_at(self, budget: float) -> float:
        slope, intercept = self._fit(self.w1s)
        return math.exp(intercept + slope * math.log(budget))

    def time_at(self, budget: float) -> float:
        slope, intercept = self._fit(self.times)
        return math.exp(intercept + slope * math.log(budget))

    def budget_to(self, w1_target: float) -> float:
        """Fitted budget that reaches ``w1_target``; NaN when W1 does not decrease with the budget."""
        slope, intercept = self._fit(self.w1s)
        return math.exp((math.log(w1_target) - intercept) / slope) if slope < 0 else math.nan

    def covers(self, budget: float) -> bool:
        return min(self.budgets) <= budget <= max(self.budgets)


def bench_slq(bench: Bench) -> None:
    pb, libs, cfg, report = bench.pb, bench.libs, bench.cfg, bench.report
    curves: dict[str, Curve] = {}
    errors: dict[str, str] = {}
    rows = []
    for probes, steps in cfg.slq_budgets:
        runs = bench.measure(slq_runs(libs, probes, steps), list(range(cfg.slq_seeds)))
        ck = next((r for r in runs if r.lib == "curvkit" and not r.error), None)
        for run in runs:
            if run.error:
                errors[run.lib] = run.error
                continue
            dist = float(np.mean([w1(nodes, weights, pb.spectrum) for nodes, weights in run.results]))
            curve = curves.setdefault(run.lib, Curve())
            curve.budgets.append(probes * steps)
            curve.times.append(run.time)
            curve.w1s.append(dist)
            rows.append([f"{probes} x {steps}", run.lib, fmt(run.mean_products), ms(run.time), f"{dist:.2e}",
                         ratio(ck.time, run.time) if ck else "n/a"])
    rows += [["", lib, why, "", "", ""] for lib, why in errors.items()]
    bench.table(f"{pb.name}: SLQ density at matched budgets (probes x steps; W1 to the exact spectrum, "
                f"mean of {cfg.slq_seeds} seeds)",
                ["budget", "library", "products", bench.time_header, "W1", "curvkit / this"], rows, lib_column=1)
    ratios, how = {}, "at equal accuracy (fitted; largest budget)"
    if len(cfg.slq_budgets) >= 3 and cfg.slq_seeds >= 2:
        ratios = slq_equal_accuracy(bench, curves)
    if not ratios and "curvkit" in curves:  # too few runs to fit: compare at the same budget (same estimator)
        t_ck = curves["curvkit"].times[-1]
        ratios = {lib: t_ck / c.times[-1] for lib, c in curves.items() if lib != "curvkit"}
        how = "at the largest matched budget"
    title = f"{pb.name}: curvkit SLQ <= {SLQ_TARGET}x the fastest anchor {how}"
    if not ratios:
        report.target(title, None)
        return
    fastest = max(ratios, key=ratios.get)  # the anchor curvkit gains least against
    report.target(f"{title} (fastest: {fastest}, {ratios[fastest]:.2f}x; "
                  + ", ".join(f"{lib} {r:.2f}x" for lib, r in ratios.items()) + ")", ratios[fastest] <= SLQ_TARGET)


def slq_equal_accuracy(bench: Bench, curves: dict[str, Curve]) -> dict[str, float]:
    """At every anchor budget: the anchor's fitted W1, curvkit's fitted time to the same W1, the ratio.

    Returns the ratio at each anchor's largest budget.
    """
    pb, report = bench.pb, bench.report
    ck = curves.get("curvkit")
    if ck is None or len(ck.budgets) < 2:
        return {}
    rows, at_largest = [], {}
    for lib in ANCHORS:
        curve = curves.get(lib)
        if curve is None or len(curve.budgets) < 2:
            continue
        for budget in curve.budgets:
            target, t_anchor = curve.w1_at(budget), curve.time_at(budget)
            ck_budget = ck.budget_to(target)
            t_ck = ck.time_at(ck_budget)
            note = "" if math.isnan(ck_budget) or ck.covers(ck_budget) else " (extrapolated)"
            rows.append([lib, str(budget), f"{target:.2e}", ms(t_anchor), f"{ms(t_ck)} at budget {ck_budget:.0f}{note}",
                         ratio(t_ck, t_anchor)])
            at_largest[lib] = t_ck / t_anchor
    report.table(f"{pb.name}: SLQ time at equal accuracy (power laws W1 ~ budget^a, time ~ budget^b fitted "
                 "to the runs above)",
                 ["anchor", "budget", "anchor W1 (fit)", f"anchor {bench.time_header} (fit)", "curvkit time to that W1",
                  "curvkit / anchor"], rows)
    return {lib: r for lib, r in at_largest.items() if not math.isnan(r)}


# --------------------------------------------------------------------------------------------- main


SECTIONS = {"hvp": bench_hvp, "eigen": bench_eigen, "trace": bench_trace, "slq": bench_slq}


@dataclass(frozen=True)
class Spec:
    name: str
    factory: Callable[[], nn.Module]
    epochs: int
    batch_size: int
    cfg: Config


def bench_problem(spec: Spec, report: Report, sections: list[str], clock: str) -> None:
    pb = make_problem(spec.name, spec.factory, spec.epochs, spec.batch_size)
    print(f"\n## {pb.name}: n = {pb.n}, batch {len(pb.batch[1])}, exact top eigenvalue {pb.spectrum[-1]:.4g}, "
          f"trace {pb.dense.trace().item():.4g}", flush=True)
    libs, broken = build_libs(pb)
    for name, why in broken.items():
        print(f"  {name}: {why}")
    bench = Bench(pb, libs, broken, spec.cfg, report, clock)
    for section in spec.cfg.sections:
        if section not in sections:
            continue
        try:
            SECTIONS[section](bench)
        except FAILURES as err:  # keep the other sections alive
            print(f"  section {section} failed: {reason(err)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute: fewer repetitions, MLP only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time, robust when other jobs share the cores (default); wall: elapsed")
    parser.add_argument("--no-resnet", action="store_true", help="skip the conv net")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # PyHessian's create_graph cycle warning, curvkit's budget warnings, ...
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [Spec("MLP 64-32-10 tanh", mlp, 20, 512, QUICK if args.quick else FULL)]
    if not (args.quick or args.no_resnet):
        specs.append(Spec("ResNet-style conv net (BatchNorm, eval)", resnet, 10, 128, RESNET))
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.1f}, "
          f"times are {args.clock} time")
    report = Report(args.clock)
    for spec in specs:
        bench_problem(spec, report, args.sections.split(","), args.clock)
    report.print_all()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
