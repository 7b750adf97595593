r"""Trust-region adversarial attacks, first and second order (Yao, Gholami, Xu, Keutzer, Mahoney, CVPR 2019).

Each example x with label y gets one target class t, fixed at the start, and the attack drives the
margin :math:`m(x) = z_y(x) - z_t(x)` down to :math:`-\kappa` with trust-region steps: a model of m
(linear for ``order=1``, quadratic with input-space Hessian-vector products for ``order=2``) is
trusted within a radius, and the ratio of the actual to the predicted decrease of m for the step
actually taken decides whether the step is kept and whether the radius grows or shrinks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._utils.random import Seed, make_generator
from ..hessian import InputHessianOperator
from ._margin import (
    best_margin,
    broken,
    candidate_jacobian,
    eval_mode,
    logits_at,
    margin_and_gradient,
    pair_margin,
)
from ._steps import NORMS, linear_step, quadratic_step, random_step, room, shorten, step_norm
from .results import AttackResult

OVERSHOOT = 0.02            # aim at margin -confidence - 2% of the initial gap (the paper's 1.02); refine trims it
ACCEPT = 0.1                # keep a step whose actual / predicted decrease exceeds this (or that breaks the example)
SHRINK_BELOW, SHRINK = 0.25, 0.5   # ratio below 0.25: the radius becomes half the step taken
GROW_ABOVE, GROW = 0.75, 2.0       # ratio above 0.75: the radius becomes at least twice the step taken
SUBPROBLEM_ITER = 20        # iterations (one Hessian-vector product each) of a second-order step's sub-problem solver
REFINE_STEPS = 10           # model evaluations per example at most for the final trim


def trust_region(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "l2", order: int = 1,
                 confidence: float = 0.0, bounds: tuple[float, float] = (0.0, 1.0), max_iter: int = 100,
                 radius: float | None = None, max_radius: float | None = None, candidates: int = 9,
                 refine: bool = True, seed: Seed = None) -> AttackResult:
    r"""Small perturbations that make a classifier's best wrong logit beat the true one by ``confidence``.

    **Target.** Among the ``candidates`` most likely wrong classes at x, the one with the smallest
    linearised distance :math:`(m_c + \kappa) / \|\nabla m_c\|_*`, :math:`m_c = z_y - z_c`, the dual norm
    (L2 for L2, L1 for Linf) taken over the coordinates free to move inside ``bounds`` (one forward pass
    and one batched backward pass for the Jacobian of those margins only). It is chosen once, as in the
    paper; the target's exact linearised distance inside the box starts its radius.

    **Step.** With radius r, ``order=1`` takes the trust-region solution of the linear model: the
    smallest step inside the box that lowers :math:`m + g^\top s` to the aim
    :math:`-\kappa - 0.02\,(m_0 + \kappa)` (2% of the initial gap past :math:`-\kappa`, the paper's
    1.02), capped at norm r: a DeepFool step capped at the radius, exact for a linear classifier.
    ``order=2`` minimises :math:`m + g^\top s + \tfrac12 s^\top H s`, H the input Hessian of m
    (Hessian-vector products from :class:`~curvkit.hessian.InputHessianOperator`): by Steihaug-CG on
    the coordinates not pinned to the box, then projected to it (L2), or by projected sign-gradient
    (conditional-gradient) steps with exact line search in the box :math:`\|s\|_\infty \le r`
    intersected with ``bounds`` (Linf), and shortens the step along itself to where the model reaches the aim.

    **Radius.** :math:`\rho = (m(x) - m(x + s)) / (\text{model decrease of } s)` for the step s actually
    taken (inside the bounds); the step is kept when :math:`\rho > 0.1` or it breaks the example;
    :math:`\rho < 0.25` sets r to half the step's norm, :math:`\rho > 0.75` to at least twice it,
    within ``max_radius``. An example whose gradient vanishes on every coordinate free to move takes a
    random step of norm r (from ``seed``) and doubles r.

    **Stopping.** Each example stops when its best wrong logit beats the true one by at least
    :math:`\kappa` (strictly, so :math:`\kappa = 0` means misclassified), or after ``max_iter``
    steps; examples that stopped are no longer evaluated. With ``refine=True`` the last step of each
    broken example is trimmed by bisection (regula falsi, Illinois) toward margin :math:`-\kappa`,
    keeping the example broken.

    The model is borrowed: it runs in eval mode during the attack (every module's mode is restored
    after); parameters, buffers and ``.grad`` are never touched; gradients are taken w.r.t. the inputs
    only. Computation follows the model's dtype and device; the global RNG is never used.

    Args:
        model: a classifier returning logits (N, C).
        x: inputs (N, ...) inside ``bounds``.
        y: true labels (N,), integers in [0, C).
        norm: ``"l2"`` or ``"linf"``, the norm of the perturbation.
        order: 1 (linear model of the margin) or 2 (quadratic model, input-space Hessian products).
        confidence: :math:`\kappa \ge 0`, the margin the wrong class must win by.
        bounds: ``(low, high)`` of the data; every adversarial example stays inside.
        max_iter: at most this many trust-region steps per example.
        radius: the initial radius for every example; None starts each at its linearised distance
            (1% of ``max_radius`` where its gradient vanishes).
        max_radius: the largest radius; None takes the box's diameter in the norm.
        candidates: how many of the most likely wrong classes compete for the target.
        refine: trim the last step's overshoot.
        seed: for the random steps of examples with a vanishing gradient (None, an int or a Generator).

    Returns:
        An :class:`~curvkit.attacks.AttackResult`: ``adversarial`` shaped like x (x's dtype and
        device), and per example ``success``, ``norms``, ``margins``, ``iterations``, ``passes``, ``products``.

    Raises:
        ValueError: x outside ``bounds``, y out of range, logits not (N, C), a non-positive radius, or
            another setting out of its range.
        TypeError: x is not a floating-point tensor or y not an integer tensor.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2, bias=False).double()
    >>> _ = model.weight.data.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # margin z0 - z1 = 2 (x0 - x1)
    >>> x, y = torch.tensor([[0.7, 0.3]], dtype=torch.float64), torch.tensor([0])
    >>> res = trust_region(model, x, y, confidence=0.5)  # closed form: (0.8 + 0.5) / (2 sqrt 2) = 0.4596
    >>> bool(res.success[0]), f"{float(res.norms[0]):.3f}", float(res.margins[0]) <= -0.5
    (True, '0.460', True)
    """
    _check_settings(norm, order, confidence, bounds, max_iter, radius, max_radius, candidates)
    _check_data(x, y, bounds)
    dtype, device = _precision(model, x)
    with eval_mode(model):
        attack = _Attack(model, x.detach().to(device, dtype), y.to(device), norm, order, float(confidence),
                         (float(bounds[0]), float(bounds[1])), radius, max_radius, make_generator(seed))
        attack.start(candidates)
        for _ in range(max_iter):
            if not attack.step():
                break
        if refine:
            attack.refine()
        return attack.result(x)


class _Attack:
    """The per-example state of one attack, advanced in lock-step over the examples still active."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, order: int, confidence: float,
                 bounds: tuple[float, float], radius: float | None, max_radius: float | None,
                 generator: torch.Generator):
        self.model, self.shape, self.dtype = model, x.shape, x.dtype
        self.norm, self.order, self.kappa = norm, order, confidence
        self.lo, self.hi = bounds
        self.generator = generator
        self.x0 = x.reshape(len(x), -1)
        self.y = y
        diameter = (self.hi - self.lo) * (math.sqrt(self.x0.shape[1]) if norm == "l2" else 1.0)
        self.max_radius = diameter if max_radius is None else float(max_radius)
        self.min_radius = 1e-9 * self.max_radius
        self.initial_radius = radius
        counts = torch.zeros(len(x), dtype=torch.long, device=x.device)
        self.iterations, self.passes, self.products = counts.clone(), counts.clone(), counts.clone()

    def _inputs(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(len(rows), *self.shape[1:])

    def _point(self, start: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``start + step`` in the model's dtype, inside the box."""
        return (start.double() + step).clamp(self.lo, self.hi).to(self.dtype)

    def _distance(self, margin: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The norm of the smallest step in the box that brings the linearised margin to -confidence, per row."""
        g = grad.reshape(len(grad), -1).double()
        s, _, _ = linear_step(g, room(self.x0.double(), g, self.lo, self.hi),
                              (margin.double() + self.kappa).clamp_min(0), None, self.norm)
        return step_norm(s, self.norm)

    def start(self, k: int) -> None:
        r"""Choose the targets (one forward, one batched backward over the candidates) and the initial radii.

        Candidates are ranked by :math:`(m_c + \kappa) / \|\nabla m_c\|_*` over the coordinates free to move
        (dual norm: L2 for L2, L1 for Linf), the box-aware distance when no coordinate reaches the box on
        the way; the exact box-aware distance of the chosen one sets the initial radius.
        """
        logits, classes, margins, jacobian = candidate_jacobian(self.model, self._inputs(self.x0), self.y, k)
        self.passes += 1 + classes.shape[1]
        g = jacobian.reshape(len(jacobian), len(self.x0), -1).double()
        free = g * (room(self.x0.double(), g, self.lo, self.hi) > 0)
        dual = free.norm(dim=2) if self.norm == "l2" else free.abs().sum(2)
        gap = (margins.T.double() + self.kappa).clamp_min(0)
        pick = torch.where(dual > 0, gap / torch.where(dual > 0, dual, 1.0), torch.inf).argmin(0)
        rows = torch.arange(len(pick), device=pick.device)
        self.targets, margin, grad = classes[rows, pick], margins[rows, pick], jacobian[pick, rows]
        dist = self._distance(margin, grad)
        self.m = margin.double()
        self.aim = -self.kappa - OVERSHOOT * (self.m + self.kappa).clamp_min(0)
        self.g = grad.reshape(len(grad), -1).double()
        self.best = best_margin(logits, self.y).double()
        self.success = broken(self.best, self.kappa)
        self.active = ~self.success
        self.xa, self.prev, self.best_prev = self.x0.clone(), self.x0.clone(), self.best.clone()
        self.reach = torch.zeros_like(self.g)  # the last kept step before clipping: refine follows its path
        if self.initial_radius is None:
            dist = (1 + OVERSHOOT) * dist
            self.radius = torch.where(dist > 0, dist, 0.01 * self.max_radius).clamp(self.min_radius, self.max_radius)
        else:
            self.radius = torch.full_like(self.m, min(float(self.initial_radius), self.max_radius))

    def step(self) -> bool:
        """One trust-region step of every active example; False when none is left."""
        idx = self.active.nonzero()[:, 0]
        if len(idx) == 0:
            return False
        xa, y, radius = self.xa[idx].double(), self.y[idx], self.radius[idx]
        if self.order == 1:
            g, m = self.g[idx], self.m[idx]
            excess = (m - self.aim[idx]).clamp_min(0)
            s, _, reach = linear_step(g, room(xa, g, self.lo, self.hi), excess, radius, self.norm)
        else:
            g, m, s, predicted = self._quadratic_step(idx, xa, radius)
            reach = s
        stuck = ~((room(xa, g, self.lo, self.hi) > 0) & (g != 0)).any(1)
        if bool(stuck.any()):
            wander = random_step(s.shape, xa, self.lo, self.hi, radius, self.norm, self.generator)
            s = reach = torch.where(stuck[:, None], wander, s)
        point = self._point(xa, s)
        taken = point.double() - xa
        if self.order == 1:  # the linear model's decrease for the step taken, after rounding to the model's dtype
            predicted = -(g * taken).sum(1)
            logits, m_new, g_new = margin_and_gradient(self.model, self._inputs(point), y, self.targets[idx])
            self.passes[idx] += 2
        else:
            logits = logits_at(self.model, self._inputs(point), y)
            m_new = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, self.targets[idx, None])[:, 0]
            self.passes[idx] += 1
        best = best_margin(logits, y).double()
        won = broken(best, self.kappa)
        good = predicted > 0
        ratio = torch.where(good, (m - m_new.double()) / torch.where(good, predicted, 1.0), -torch.inf)
        self.radius[idx] = self._new_radius(radius, ratio, step_norm(taken, self.norm), stuck)
        keep = won | stuck | (ratio > ACCEPT)
        kept = idx[keep]
        self.prev[kept], self.best_prev[kept], self.reach[kept] = self.xa[kept], self.best[kept], reach[keep]
        self.xa[kept], self.best[kept], self.m[kept] = point[keep], best[keep], m_new[keep].double()
        if self.order == 1:
            self.g[kept] = g_new.reshape(len(idx), -1)[keep].double()
        self.success[idx[won]] = True
        self.active[idx[won]] = False
        self.iterations[idx] += 1
        return True

    def _quadratic_step(self, idx: torch.Tensor, xa: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """At the active points: gradient, margin, the second-order step inside the box and its predicted decrease.

        The step is projected to the box before it is shortened, so the prediction is for the step taken (up to
        rounding to the model's dtype). One forward and one backward build the Hessian graph for all products.
        """
        pairs = torch.stack([self.y[idx], self.targets[idx]], 1)
        H = InputHessianOperator(self.model, pair_margin, self._inputs(xa.to(self.dtype)), pairs)
        g, m = H.gradient.reshape(len(idx), -1).double(), H.values.double()
        s, a, b = quadratic_step(H, g, xa, self.lo, self.hi, radius, self.norm, SUBPROBLEM_ITER)
        s, predicted = shorten(s, a, b, (m - self.aim[idx]).clamp_min(0))
        self.passes[idx] += 2
        self.products[idx] += H.matvecs
        return g, m, s, predicted

    def _new_radius(self, radius: torch.Tensor, ratio: torch.Tensor, size: torch.Tensor,
                    stuck: torch.Tensor) -> torch.Tensor:
        """Half the step on a poor ratio, at least twice the step on a good one, doubled after a random step."""
        new = torch.where(ratio < SHRINK_BELOW, SHRINK * size, radius)
        new = torch.where(ratio > GROW_ABOVE, torch.maximum(radius, GROW * size), new)
        new = torch.where(stuck, GROW * radius, new)
        return new.clamp(self.min_radius, self.max_radius)

    def refine(self) -> None:
        """Trim the last step of every broken example toward margin -confidence (regula falsi, Illinois variant).

        The bracket is the last step's path, ``clamp(start + t * reach)`` for t in [0, 1] (the first-order path
        bends where it meets the box): its start is not broken, its end is; the trial points aim just inside
        the broken side, and the end moves to every broken trial, so the example stays broken.
        """
        rows = (self.success & (self.iterations > 0)).nonzero()[:, 0]
        if len(rows) == 0:
            return
        start, span, y = self.prev[rows].double(), self.reach[rows], self.y[rows]
        f_lo, f_hi = self.best_prev[rows] + self.kappa, self.best[rows] + self.kappa
        goal = -1e-4 * (f_lo - f_hi)
        t_lo, t_hi = torch.zeros_like(f_lo), torch.ones_like(f_hi)
        side = torch.zeros_like(f_lo)
        running = torch.ones_like(rows, dtype=torch.bool)
        for _ in range(REFINE_STEPS):
            sub = running.nonzero()[:, 0]
            if len(sub) == 0:
                break
            lo, hi = t_lo[sub], t_hi[sub]
            t = lo + (f_lo[sub] - goal[sub]) * (hi - lo) / (f_lo[sub] - f_hi[sub])
            t = torch.where((t > lo) & (t < hi), t, 0.5 * (lo + hi))
            point = self._point(start[sub], t[:, None] * span[sub])
            best = best_margin(logits_at(self.model, self._inputs(point), y[sub]), y[sub]).double()
            self.passes[rows[sub]] += 1
            won = broken(best, self.kappa)
            f = best + self.kappa
            self.xa[rows[sub[won]]], self.best[rows[sub[won]]] = point[won], best[won]
            t_hi[sub], t_lo[sub] = torch.where(won, t, hi), torch.where(won, lo, t)
            f_lo[sub] = torch.where(won, torch.where(side[sub] > 0, 0.5 * f_lo[sub], f_lo[sub]), f)
            f_hi[sub] = torch.where(won, f, torch.where(side[sub] < 0, 0.5 * f_hi[sub], f_hi[sub]))
            side[sub] = won.to(side.dtype) * 2 - 1
            close = (won & (f >= 2 * goal[sub])) | (t_hi[sub] - t_lo[sub] <= 1e-6)
            running[sub[close]] = False

    def result(self, x: torch.Tensor) -> AttackResult:
        """The adversarial examples in x's dtype and device, with margins measured at exactly those."""
        adversarial = self._inputs(self.xa).to(x.device, x.dtype)
        margins = self.best
        if adversarial.dtype != self.dtype:
            margins = best_margin(logits_at(self.model, adversarial.to(self.xa.device, self.dtype), self.y),
                                  self.y).double()
        norms = step_norm((adversarial - x).reshape(len(x), -1).double(), self.norm)
        per_example = [broken(margins, self.kappa), norms, margins, self.iterations, self.passes, self.products]
        return AttackResult(adversarial, *(t.to(x.device) for t in per_example), self.norm)


def _precision(model: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter (or buffer), else those of x."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return x.dtype, x.device


def _check_settings(norm, order, confidence, bounds, max_iter, radius, max_radius, candidates) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 (linear model) or 2 (quadratic model), got {order!r}")
    if not _number(confidence) or confidence < 0:
        raise ValueError(f"confidence must be a finite number >= 0, got {confidence!r}")
    if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2 or not all(map(_number, bounds))
            or not bounds[0] < bounds[1]):
        raise ValueError(f"bounds must be (low, high) with finite low < high, got {bounds!r}")
    for name, value in (("max_iter", max_iter), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("radius", radius), ("max_radius", max_radius)):
        if value is not None and (not _number(value) or value <= 0):
            raise ValueError(f"{name} must be a positive number (or None for the default), got {value!r}")
    if radius is not None and max_radius is not None and radius > max_radius:
        raise ValueError(f"radius {radius} exceeds max_radius {max_radius}; lower radius or raise max_radius")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_data(x: object, y: object, bounds: tuple[float, float]) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or len(x) == 0:
        raise TypeError("x must be a non-empty floating-point tensor (N, ...) of inputs, one row per example")
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (len(x),):
        raise TypeError(f"y must be an integer tensor of {len(x)} labels, one per row of x")
    low, high = float(x.min()), float(x.max())
    if not (bounds[0] <= low and high <= bounds[1]):
        raise ValueError(f"x has values in [{low:.6g}, {high:.6g}], outside bounds {tuple(bounds)}; pass the "
                         "bounds of your data (e.g. bounds=(0.0, 1.0) for images scaled to [0, 1])")
    if int(y.min()) < 0:
        raise ValueError(f"labels y must be >= 0, got {int(y.min())}")
