"""LocalNewton and GIANT (curvkit.optim) against local SGD and full-batch GD on 4 gloo workers.

    torchrun --nproc-per-node 4 benchmarks/local_newton.py [--quick] [--out benchmarks/figures]
    python benchmarks/local_newton.py --floors-only [--workers 4]

l2-regularised logistic regression (lambda 1e-3) on sklearn's digits (0-4 against 5-9; 1797 samples, 64 pixels
scaled to [0, 1]) and on a synthetic 20,000 x 60 problem, each split into iid and label-skewed shards. Relative
suboptimality (f - f*) / f*, with f* scipy's trust-exact optimum, is measured on the full data at every consensus
model, against communication rounds (all-reduces, counted by a wrapper around torch.distributed.all_reduce) and
against the workers' step time. Local compute per worker: Hessian-vector products, and loss or gradient
evaluations in full-shard passes. Then a 64-32-10 tanh MLP on the 10-class digits (non-convex: training loss after
a number of rounds), and single-process NewtonCG to 1e-9 on both convex problems. Rank 0 prints the tables and
writes figures (loss against rounds and against time) to --out.

Last, the floors (alone with --floors-only, in one process without torchrun): the same shards with every Newton
system solved exactly in float64. Plain LocalNewton's fixed points (its stall level whatever the rounds), and the
rounds that corrected LocalNewton and GIANT need when local solves are exact.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from curvkit.datasets import load_digits_tensors
from curvkit.optim import LocalNewton, NewtonCG
from curvkit.optim.newton import STEP_SIZES, _armijo  # the optimizers' own step sizes and Armijo test

LAM = 1e-3
TARGETS = (1e-3, 1e-6, 1e-9)
STOP = 1e-10
FLOOR_BUDGETS = (24, 60)  # rounds for the floors' plain LocalNewton (it stalls) and for the converging methods


class Rounds:
    """Counts every torch.distributed.all_reduce call, independently of the optimizers' own counters."""

    def __init__(self):
        self.calls = 0
        self._all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._all_reduce(*args, **kwargs)

        dist.all_reduce = counted

    def uncounted_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of per-rank figures, for the report (not a training round)."""
        t = torch.tensor(values, dtype=torch.float64)
        self._all_reduce(t)
        return (t / dist.get_world_size()).tolist()


# ------------------------------------------------------------------------------------------ problems


def digits_binary():
    """All 1797 digits, pixels / 16 in [0, 1] (not standardised: see BENCHMARKS.md), 0-4 against 5-9."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float64), torch.tensor(y >= 5, dtype=torch.float64)


def synthetic(n=20_000, d=60):
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -1, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    w = 3 * torch.randn(d, generator=g, dtype=torch.float64) / (math.sqrt(d) * scales.mean())
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    return x, y


def split(x, y, world, how):
    """iid: a fixed random order cut in ``world`` pieces; label-skewed: a sample of label c goes to shard k with
    probability proportional to k + 1 (c = 1) or world - k (c = 0), about 20/40/60/80% positives on 4 balanced
    shards. Both fixed by seed; unequal shard sizes are weighted in the loss."""
    g = torch.Generator().manual_seed(1)
    if how == "iid":
        return [(x[i], y[i]) for i in torch.tensor_split(torch.randperm(len(y), generator=g), world)]
    k = torch.arange(world, dtype=torch.float64)
    weights = torch.stack([world - k, k + 1])[y.long()]
    owner = torch.multinomial(weights, 1, generator=g)[:, 0]
    return [(x[owner == r], y[owner == r]) for r in range(world)]


def logistic_loss(model, x, y, weight=1.0):
    """weight * mean logistic loss + (LAM / 2) ||theta||^2 (weights n_k W / N make the rank mean the data mean)."""
    reg = model.weight.square().sum() + model.bias.square().sum()
    return weight * F.binary_cross_entropy_with_logits(model(x)[:, 0], y) + LAM / 2 * reg


def logistic_model(d):
    model = nn.Linear(d, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def mlp_model():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[-1]))
    return model


def mlp_loss(model, x, y, weight=1.0):
    return weight * F.cross_entropy(model(x), y) + 1e-4 / 2 * sum(p.square().sum() for p in model.parameters())


def with_bias(x):
    """x with a ones column appended: the flat parameters are [weight, bias]."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


class Logistic:
    """:func:`logistic_loss` in flat float64 parameters [weight, bias], with closed-form derivatives.

    Args:
        x: the features (n x d).
        y: the labels in {0, 1}.
        weight: multiplies the mean logistic loss (n_k W / N for a shard: the mean over shards is the data's).
    """

    def __init__(self, x, y, weight=1.0):
        self.x, self.y, self.scale = with_bias(x), y, weight / len(y)

    def value(self, t):
        """The objective at t, a float."""
        z = self.x @ t
        return float(self.scale * (F.softplus(z) - self.y * z).sum() + LAM / 2 * t @ t)

    def grad(self, t):
        """The gradient at t."""
        return self.scale * self.x.T @ (torch.sigmoid(self.x @ t) - self.y) + LAM * t

    def hess(self, t):
        """The Hessian at t."""
        s = torch.sigmoid(self.x @ t)
        return self.scale * (self.x.T * (s * (1 - s))) @ self.x + LAM * torch.eye(len(t), dtype=t.dtype)


def scipy_optimum(x, y) -> tuple[float, torch.Tensor]:
    """f* and the optimum (flat [weight, bias]) by scipy's trust-exact with exact gradients and Hessians (float64)."""
    from scipy.optimize import minimize

    objective = Logistic(x, y)

    def numpy(method):
        return lambda theta: np.asarray(method(torch.from_numpy(theta)))

    res = minimize(numpy(objective.value), np.zeros(x.shape[1] + 1), jac=numpy(objective.grad),
                   hess=numpy(objective.hess), method="trust-exact", options={"gtol": 1e-13})
    return float(res.fun), torch.from_numpy(res.x)


# ------------------------------------------------------------------------------------------ methods


@dataclass
class Trace:
    """One method's run: at each consensus model, rounds, seconds of step time, and local work so far."""

    name: str
    rounds: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    hvps: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


class Run:
    """Drives one method on this rank's shard and records the full-data loss at every consensus model."""

    def __init__(self, name, counter, full_loss, budget):
        self.trace = Trace(name)
        self.counter, self.full_loss, self.budget = counter, full_loss, budget
        self.start_calls = counter.calls
        self.seconds = 0.0
        self.passes = 0.0

    @property
    def rounds(self):
        return self.counter.calls - self.start_calls

    def record(self, hvps, stop_at):
        """Record a consensus model; True when the run should stop (every rank decides alike)."""
        loss = self.full_loss()
        self.trace.rounds.append(self.rounds)
        self.trace.seconds.append(self.seconds)
        self.trace.hvps.append(float(hvps))
        self.trace.passes.append(self.passes)
        self.trace.loss.append(loss)
        return self.rounds >= self.budget or (stop_at is not None and loss <= stop_at)


def run_newton(name, make, model, closure, run: Run, stop_at):
    opt = make(model.parameters())
    calls = [0]

    def counted():
        calls[0] += 1
        return closure()

    run.record(0, None)
    while True:
        before = run.rounds
        tick = time.perf_counter()
        opt.step(counted)
        run.seconds += time.perf_counter() - tick
        run.passes = calls[0]
        assert opt.comm_rounds == run.rounds, (name, opt.comm_rounds, run.rounds)
        if run.rounds > before and getattr(opt, "phase_step", 0) == 0:  # a consensus model
            if run.record(opt.matvecs, stop_at):
                return run.trace


def run_gd(model, closure, lr, run: Run, stop_at):
    """Synchronous full-batch gradient descent: one gradient all-reduce per step."""
    params = list(model.parameters())
    world = dist.get_world_size()
    run.record(0, None)
    while True:
        tick = time.perf_counter()
        grads = torch.autograd.grad(closure(), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        with torch.no_grad():
            for p, g in zip(params, torch.split(flat / world, [p.numel() for p in params])):
                p.sub_(lr * g.view_as(p))
        run.seconds += time.perf_counter() - tick
        run.passes += 1
        if run.record(0, stop_at):
            return run.trace


def run_local_sgd(model, shard, loss_fn, weight, lr, batch, run: Run, stop_at, seed):
    """Local SGD: one local epoch of minibatch SGD between averagings (torch's PeriodicModelAverager)."""
    x, y = shard
    steps = max(1, len(y) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    averager = PeriodicModelAverager(period=steps, warmup_steps=steps - 1)  # averages after steps, 2 steps, ...
    g = torch.Generator().manual_seed(seed)
    run.record(0, None)
    while True:
        tick = time.perf_counter()
        order = torch.randperm(len(y), generator=g)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x[idx], y[idx], weight).backward()
            opt.step()
            averager.average_parameters(model.parameters())
        run.seconds += time.perf_counter() - tick
        run.passes += 1
        if run.record(0, stop_at):
            return run.trace


def best_lr(label, lrs, new_model, full_loss, budget, counter, go) -> Trace:
    """A first-order baseline at each learning rate of a small grid; the run with the lowest final loss."""
    best = None
    for lr in lrs:
        model = new_model()
        edge = " (edge of the grid)" if lr in (min(lrs), max(lrs)) else ""
        trace = go(model, lr, Run(f"{label}, lr {lr:.3g}{edge}", counter, full_loss(model), budget))
        if best is None or trace.loss[-1] < best.loss[-1]:
            best = trace
    return best


def evaluate(loss) -> float:
    with torch.no_grad():
        return float(loss())


def smoothness(x) -> float:
    """An upper bound on the logistic loss's curvature: ||X~||^2 / (4 N) + LAM (X~: x with a ones column)."""
    return float(torch.linalg.matrix_norm(with_bias(x), ord=2) ** 2 / (4 * len(x))) + LAM


# ------------------------------------------------------------------------------------------ report


def relative(trace: Trace, f_star):
    """The trace's relative suboptimality (f - f*) / f* at each recorded model."""
    return [(v - f_star) / f_star for v in trace.loss]


def first(trace: Trace, values, threshold, attr="rounds"):
    hit = next((i for i, v in enumerate(values) if v <= threshold), None)
    return None if hit is None else getattr(trace, attr)[hit]


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if digits else f"{int(v)}"


def convex_table(traces, f_star):
    rows = ["| method | rounds to 1e-3 | 1e-6 | 1e-9 | step time to 1e-6 (s) | HVPs/worker to 1e-6 | "
            "shard passes/worker to 1e-6 | best subopt (rounds run) |", "|" + "---|" * 8]
    for t in traces:
        sub = relative(t, f_star)
        r = [first(t, sub, e) for e in TARGETS]
        rows.append(f"| {t.name} | {fmt(r[0])} | {fmt(r[1])} | {fmt(r[2])} | "
                    f"{fmt(first(t, sub, 1e-6, 'seconds'), 2)} | {fmt(first(t, sub, 1e-6, 'hvps'))} | "
                    f"{fmt(first(t, sub, 1e-6, 'passes'))} | {max(min(sub), 0):.1e} ({t.rounds[-1]}) |")
    return "\n".join(rows)


def mlp_table(traces, checkpoints):
    head = " | ".join(f"loss at {c} rounds" for c in checkpoints)
    rows = [f"| method | {head} | HVPs/worker (rounds run) |", "|" + "---|" * (len(checkpoints) + 2)]
    for t in traces:
        cells = []
        for c in checkpoints:
            idx = [i for i, r in enumerate(t.rounds) if r <= c]
            cells.append(f"{t.loss[idx[-1]]:.4f}" if idx else "-")
        rows.append(f"| {t.name} | {' | '.join(cells)} | {fmt(t.hvps[-1])} ({t.rounds[-1]}) |")
    return "\n".join(rows)


def plot(traces, f_star, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in traces:
        y = [max((v - f_star) / f_star, 1e-16) for v in t.loss] if f_star else t.loss
        axes[0].semilogy(t.rounds, y, marker=".", label=t.name)
        axes[1].semilogy(t.seconds, y, marker=".", label=t.name)
    label = "relative suboptimality" if f_star else "training loss"
    axes[0].set(xlabel="communication rounds", ylabel=label, title=title)
    axes[1].set(xlabel="step time, rank 0 (s)", ylabel=label)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ floors


class Quadratic:
    """The second-order Taylor model of an objective at a point (f, g and H frozen there).

    Args:
        objective: has ``value``, ``grad`` and ``hess`` of flat float64 parameters.
        at: the expansion point.
    """

    def __init__(self, objective, at):
        self.at, self.f0, self.g0, self.h = at, objective.value(at), objective.grad(at), objective.hess(at)

    def value(self, t):
        """The model at t, a float."""
        d = t - self.at
        return float(self.f0 + self.g0 @ d + d @ self.h @ d / 2)

    def grad(self, t):
        """The model's gradient at t."""
        return self.g0 + self.h @ (t - self.at)

    def hess(self, t):
        """The model's (constant) Hessian."""
        return self.h


class Mean:
    """The global objective f = (1/W) sum_k f_k of the shards' objectives.

    Args:
        shards: objectives with ``value``, ``grad`` and ``hess``.
    """

    def __init__(self, shards):
        self.shards = shards

    def value(self, t):
        """f at t, a float."""
        return sum(s.value(t) for s in self.shards) / len(self.shards)

    def grad(self, t):
        """The gradient of f at t."""
        return torch.stack([s.grad(t) for s in self.shards]).mean(0)


def armijo(phi, v, p, slope) -> float:
    """The optimizers' step size along p: the first of their candidates passing their Armijo test on phi (or 0)."""
    start, eps = phi(v), torch.finfo(torch.float64).eps
    return next((t for t in STEP_SIZES if _armijo(phi(v + t * p), start, t, slope, eps)), 0.0)


def newton(objective, start, linear=None, steps=None):
    """Newton steps with exact directions and the optimizers' Armijo search on objective(v) - <linear, v>.

    Args:
        objective: has ``value``, ``grad`` and ``hess``.
        start: the starting point.
        linear: the linear term (None: 0).
        steps: take this many steps (a LocalNewton phase with L = steps); None: run to the exact minimiser
            (stop after a step shorter than 1e-10 (1 + |v|), which quadratic convergence leaves at rounding level).

    Returns:
        The end point and the smallest step size taken (1.0: only full Newton steps).

    Raises:
        RuntimeError: no convergence to the minimiser in 100 steps.
    """
    linear = torch.zeros_like(start) if linear is None else linear

    def phi(v):
        return objective.value(v) - float(linear @ v)

    v, smallest = start, 1.0
    for _ in range(100 if steps is None else steps):
        g = objective.grad(v) - linear
        p = -torch.linalg.solve(objective.hess(v), g)
        t = armijo(phi, v, p, float(g @ p))
        if t == 0 and steps is None:  # a decrease below phi's rounding: near enough for a full step to converge
            t = 1.0
        v, smallest = v + t * p, min(smallest, t)
        if steps is None and float(p.norm()) <= 1e-10 * (1 + float(v.norm())):
            return v, smallest
    if steps is None:
        raise RuntimeError("Newton's method did not reach the minimiser in 100 steps")
    return v, smallest


def phase(shards, w, steps, corrected):
    """One idealised LocalNewton phase from the consensus model w, and its smallest local step size.

    Args:
        shards: the shards' objectives.
        w: the consensus model.
        steps: Newton steps per shard (L), None: exact local minimisers.
        corrected: minimise f_k(v) - <g_k(w) - g(w), v> (the gradient correction) instead of f_k.

    Returns:
        The average of the shards' end points, and the smallest step size any of them took.
    """
    g = Mean(shards).grad(w) if corrected else None
    ends = [newton(s, w, s.grad(w) - g if corrected else None, steps) for s in shards]
    return torch.stack([v for v, _ in ends]).mean(0), min(t for _, t in ends)


def giant_step(shards, w, search):
    """One GIANT step with exact local solves: p = -mean_k H_k(w)^{-1} g(w), then w + t p.

    Args:
        shards: the shards' objectives.
        w: the current model.
        search: t = 1 (``"unit"``), NewtonCG's Armijo candidates (``"armijo"``) or the minimiser of f along p
            (``"exact"``).

    Returns:
        The next model.
    """
    from scipy.optimize import minimize_scalar

    f = Mean(shards)
    g = f.grad(w)
    p = -torch.stack([torch.linalg.solve(s.hess(w), g) for s in shards]).mean(0)
    if search == "unit":
        t = 1.0
    elif search == "armijo":
        t = armijo(f.value, w, p, float(g @ p))
    else:
        t = float(minimize_scalar(lambda t: f.value(w + t * p), bracket=(0.0, 1.0)).x)
    return w + t * p


def iterate(name, update, per_update, f, f_star, start, budget=FLOOR_BUDGETS[1]):
    """Trace of an idealised method: f after each update (``per_update`` rounds each), up to ``budget`` rounds.

    Args:
        name: the trace's name.
        update: the next consensus model from the current one.
        per_update: communication rounds per update.
        f: the global objective.
        f_star: its optimum; the trace stops early at relative suboptimality STOP.
        start: the first model.
        budget: the most rounds.

    Returns:
        The trace (rounds and loss only) and the last model.
    """
    trace, w = Trace(name), start
    while True:
        trace.rounds.append(per_update * len(trace.loss))
        trace.loss.append(f.value(w))
        if trace.rounds[-1] + per_update > budget or trace.loss[-1] <= f_star * (1 + STOP):
            return trace, w
        w = update(w)


def plain_fixed_point(shards, steps, start):
    """The fixed point of plain LocalNewton with exact Newton steps, L = steps (None: L -> infinity).

    L -> infinity: the average of the shards' exact minimisers, reached in one phase from anywhere. Finite L:
    the root of phase(w) - w by scipy's ``root``, from ``start`` (for L = 1 with full steps:
    mean_k H_k(w)^{-1} g_k(w) = 0).

    Args:
        shards: the shards' objectives.
        steps: L, or None.
        start: where the root search starts (a model near the fixed point).

    Returns:
        The fixed point, its residual |phase(w) - w| (local solves restarted from w itself), and whether every
        local step there is a full Newton step (else Armijo's shorter steps define it).

    Raises:
        AssertionError: the residual is not at rounding level.
    """
    from scipy.optimize import root

    if steps is None:
        w = phase(shards, start, None, False)[0]
    else:
        def residual(v):
            return phase(shards, torch.from_numpy(v), steps, False)[0].numpy() - v

        w = torch.from_numpy(root(residual, start.numpy(), method="hybr", tol=1e-15).x)
    end, smallest = phase(shards, w, steps, False)
    gap = float((end - w).norm())
    assert gap <= 1e-9 * (1 + float(w.norm())), f"not a fixed point: residual {gap:.1e} (L = {steps})"
    return w, gap, smallest == 1.0


def floors_split(x, y, f_star, w_star, world, how):
    """The idealised methods on one split (see :func:`floors_section`).

    Returns:
        A markdown table, and a line comparing one exact corrected phase with one unit GIANT step on the
        quadratic model at the optimum, with their rounds to 1e-6 on it.
    """
    shards = [Logistic(xs, ys, len(ys) * world / len(y)) for xs, ys in split(x, y, world, how)]
    f, zero = Mean(shards), torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    rows = ["| method (exact solves) | rounds to 1e-3 | 1e-6 | 1e-9 | best subopt (rounds run) | fixed point: subopt | "
            "residual | full local steps there |", "|" + "---|" * 8]

    def row(trace, fixed="| - | - | - |"):
        sub = relative(trace, f_star)
        r = [fmt(first(trace, sub, e)) for e in TARGETS]
        rows.append(f"| {trace.name} | {' | '.join(r)} | {max(min(sub), 0):.1e} ({trace.rounds[-1]}) {fixed}")

    for corrected, per_phase, rounds in ((False, 1, "1 round"), (True, 2, "2 rounds")):
        for steps in (1, 2, 4, 8, None):
            label = (f"{'corrected' if corrected else 'plain'} LocalNewton "
                     f"{f'L={steps}' if steps else 'L -> inf (exact local minimisers)'}, {rounds}/phase")
            trace, w = iterate(label, lambda w, s=steps, c=corrected: phase(shards, w, s, c)[0], per_phase, f,
                               f_star, zero, FLOOR_BUDGETS[corrected])
            if corrected:  # its fixed point is the optimum
                row(trace)
                continue
            w, gap, full = plain_fixed_point(shards, steps, w)
            row(trace, f"| {max((f.value(w) - f_star) / f_star, 0):.1e} | {gap:.0e} | {'yes' if full else 'no'} |")
    for search, label in (("unit", "unit step"), ("armijo", "NewtonCG's Armijo search"),
                          ("exact", "exact line search")):
        row(iterate(f"GIANT, {label}, 3 rounds/step",
                    lambda w, s=search: giant_step(shards, w, s), 3, f, f_star, zero)[0])

    model = [Quadratic(s, w_star) for s in shards]
    gap = float((phase(model, zero, None, True)[0] - giant_step(model, zero, "unit")).norm())
    local, giant = (first(t, relative(t, f_star), 1e-6) for t in (
        iterate("", lambda w: phase(model, w, None, True)[0], 2, Mean(model), f_star, zero)[0],
        iterate("", lambda w: giant_step(model, w, "unit"), 3, Mean(model), f_star, zero)[0]))
    note = ("quadratic model at the optimum (f_k's Taylor models there): one corrected phase with exact local "
            f"minimisers from 0 minus one unit GIANT step: |difference| {gap:.0e}; rounds to 1e-6 on the model: "
            f"corrected L -> inf {fmt(local)}, GIANT unit step {fmt(giant)}")
    return "\n".join(rows), note


def floors_section(name, x, y, world):
    """Single-process floors for one problem: idealised methods with exactly solved Newton systems (float64).

    Plain LocalNewton with exact Newton steps (L = 1, 2, 4, 8 and L -> infinity) from zero, and the relative
    suboptimality of its fixed point: its stall level whatever the rounds. Corrected LocalNewton with the same
    local steps (2 rounds per phase) and GIANT with exact local solves (3 rounds per step: unit step,
    NewtonCG's Armijo search, exact line search): the fewest rounds to each target that these methods can
    reach when the local systems cost nothing.

    Args:
        name: the problem's name.
        x: its features.
        y: its labels.
        world: the number of shards.

    Returns:
        The markdown section: one table per split, and the quadratic-model check under each.
    """
    f_star, w_star = scipy_optimum(x, y)
    out = [f"### Floors: {name} (N = {len(y)}, {world} shards, f* = {f_star:.12f})"]
    for how in ("iid", "label-skewed"):
        table, note = floors_split(x, y, f_star, w_star, world, how)
        out += [f"\n#### {name}, {how} shards, exact solves\n", table, f"\n{note}"]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main


def convex_methods(quick):
    newton = [("NewtonCG (GIANT)", lambda p: NewtonCG(p), 30)]
    fixed = [] if quick else [(f"LocalNewton L={L}", lambda p, L=L: LocalNewton(p, local_steps=L), 12)
                              for L in (1, 2, 4, 8)]
    return newton + fixed + [
        ("LocalNewton adaptive", lambda p: LocalNewton(p), 12),
        ("LocalNewton adaptive + correction", lambda p: LocalNewton(p, gradient_correction=True), 24),
        ("LocalNewton L=2 + correction", lambda p: LocalNewton(p, local_steps=2, gradient_correction=True), 24),
    ]


def convex_section(name, x, y, args, counter, rank, world):
    f_star, _ = scipy_optimum(x, y)
    out = [f"### {name}: N = {len(y)}, d = {x.shape[1]} (+ bias), lambda = {LAM}, f* = {f_star:.12f}"]
    model = logistic_model(x.shape[1])
    opt = NewtonCG(model.parameters(), distributed=False)
    steps, sub = 0, math.inf
    while sub > 1e-9 and steps < 30:
        opt.step(lambda: logistic_loss(model, x, y))
        steps += 1
        sub = (evaluate(lambda: logistic_loss(model, x, y)) - f_star) / f_star
    out.append(f"single-process NewtonCG (defaults): relative suboptimality {max(sub, 0):.1e} after {steps} steps "
               f"(target 1e-9: {'met' if sub <= 1e-9 else 'missed'})")
    results = {}
    for how in ("iid", "label-skewed"):
        shard = split(x, y, world, how)[rank]
        weight = len(shard[1]) * world / len(y)
        positives = ", ".join(f"{float(s[1].mean()):.2f}" for s in split(x, y, world, how))
        traces = []

        def full_loss(model_ref):
            return lambda: evaluate(lambda: logistic_loss(model_ref, x, y))

        for label, make, budget in convex_methods(args.quick):
            model = logistic_model(x.shape[1])
            run = Run(label, counter, full_loss(model), budget)
            traces.append(run_newton(label, make, model, lambda m=model: logistic_loss(m, *shard, weight), run,
                                     f_star * (1 + STOP)))
        L = smoothness(x)
        new = lambda: logistic_model(x.shape[1])  # noqa: E731
        traces.append(best_lr("full-batch GD", [1 / L, 4 / L, 16 / L], new, full_loss, 60 if args.quick else 300,
                              counter, lambda m, lr, run: run_gd(m, lambda: logistic_loss(m, *shard, weight), lr, run,
                                                        f_star * (1 + STOP))))
        traces.append(best_lr("local SGD (1 epoch/round, batch 64)", [1 / L, 4 / L, 16 / L], new, full_loss,
                              20 if args.quick else 60, counter,
                              lambda m, lr, run: run_local_sgd(m, shard, logistic_loss, weight, lr, 64, run,
                                                               f_star * (1 + STOP), seed=rank)))
        for t in traces:  # HVPs: the mean over workers (their CG iterations differ)
            t.hvps = counter.uncounted_mean(t.hvps)
        results[how] = traces
        if rank == 0:
            out.append(f"\n#### {name}, {how} shards (positive fraction per shard: {positives})\n")
            out.append(convex_table(traces, f_star))
            plot(traces, f_star, f"{name}, {how}", Path(args.out) / f"local_newton_{_slug(name)}_{_slug(how)}.png")
    return "\n".join(out), results, f_star


def mlp_section(args, counter, rank, world):
    (x, y), _ = load_digits_tensors(0)
    x = x.double()
    shard = split(x, y.double(), world, "iid")[rank]
    shard = (shard[0], shard[1].long())
    weight = len(shard[1]) * world / len(y)
    budget = 12 if args.quick else 30
    traces = []
    methods = [("NewtonCG (GIANT)", lambda p: NewtonCG(p)),
               ("LocalNewton adaptive", lambda p: LocalNewton(p)),
               ("LocalNewton adaptive + correction", lambda p: LocalNewton(p, gradient_correction=True))]

    def full_loss(model):
        return lambda: evaluate(lambda: mlp_loss(model, x, y))

    for label, make in methods:
        model = mlp_model()
        run = Run(label, counter, full_loss(model), budget)
        traces.append(run_newton(label, make, model, lambda m=model: mlp_loss(m, *shard, weight), run, None))

    traces.append(best_lr("full-batch GD", [0.5, 2.0, 8.0, 32.0], mlp_model, full_loss, budget, counter,
                          lambda m, lr, run: run_gd(m, lambda: mlp_loss(m, *shard, weight), lr, run, None)))
    traces.append(best_lr("local SGD (1 epoch/round, batch 32)", [0.1, 0.3, 1.0, 3.0], mlp_model, full_loss, budget,
                          counter, lambda m, lr, run: run_local_sgd(m, shard, mlp_loss, weight, lr, 32, run, None,
                                                                    seed=rank)))
    for t in traces:
        t.hvps = counter.uncounted_mean(t.hvps)
    if rank == 0:
        plot(traces, None, "MLP 64-32-10 on digits, iid", Path(args.out) / "local_newton_mlp.png")
        return ("### MLP 64-32-10 tanh on digits (10 classes, 1437 samples, iid shards, l2 1e-4)\n\n"
                + mlp_table(traces, [3, 6, 12] if args.quick else [6, 12, 30]))
    return ""


def verdicts(results) -> str:
    lines = []
    for name, by_split in results.items():
        f_star = by_split["f*"]
        for how in ("iid", "label-skewed"):
            traces = {t.name: t for t in by_split[how]}

            def rounds(label, eps):
                t = traces[label]
                return first(t, relative(t, f_star), eps)

            giant3, giant6 = rounds("NewtonCG (GIANT)", 1e-3), rounds("NewtonCG (GIANT)", 1e-6)
            for label, eps, ratio, base in (("LocalNewton adaptive + correction", 1e-6, 0.5, giant6),
                                            ("LocalNewton L=2 + correction", 1e-6, 0.5, giant6),
                                            ("LocalNewton adaptive", 1e-3, 0.6, giant3)):
                mine = rounds(label, eps)
                ok = mine is not None and base is not None and mine <= ratio * base
                lines.append(f"| {name}, {how} | {label} to {eps:.0e} | {fmt(mine)} rounds vs GIANT {fmt(base)} "
                             f"(target <= {ratio} x) | {'met' if ok else 'missed'} |")
    return "| problem | what | measured | verdict |\n|---|---|---|---|\n" + "\n".join(lines)


def _slug(s):
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def problems():
    """The two convex problems, by name: (x, y) each."""
    return {"digits binary": digits_binary(), "synthetic 20k x 60": synthetic()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/figures")
    parser.add_argument("--quick", action="store_true", help="fewer methods and rounds (a smoke test)")
    parser.add_argument("--floors-only", action="store_true",
                        help="only the single-process floors (exact local solves), without torchrun")
    parser.add_argument("--workers", type=int, default=4, help="shards for --floors-only (torchrun's otherwise)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.floors_only:
        start = time.perf_counter()
        print("\n\n".join(floors_section(name, x, y, args.workers) for name, (x, y) in problems().items()))
        print(f"\nwall time {time.perf_counter() - start:.0f} s")
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    counter = Rounds()
    start = time.perf_counter()
    report, results = [], {}
    for name, (x, y) in problems().items():
        text, traces, f_star = convex_section(name, x, y, args, counter, rank, world)
        report.append(text)
        results[name] = {**traces, "f*": f_star}
    report.append(mlp_section(args, counter, rank, world))
    dist.destroy_process_group()
    if rank == 0:
        print(f"{world} gloo workers, one thread each; rounds = all-reduce calls\n")
        print("\n\n".join(report))
        print("\n### Targets\n")
        print(verdicts(results))
        print()
        print("\n\n".join(floors_section(name, x, y, world) for name, (x, y) in problems().items()))
        print(f"\nwall time {time.perf_counter() - start:.0f} s; figures in {args.out}")


if __name__ == "__main__":
    main()
