r"""Trust-region steps of a margin model inside the data box, row by row (one row per example).

Every function works on flattened rows in float64: ``x`` (B, n) the current points, ``g`` (B, n)
the margin's input gradients, ``lo``/``hi`` the box, ``radius`` (B,) the trust radii.

First order. For a linear model :math:`m + g^\top s` the steps that matter lie on one path: the
minimal-norm step that lowers the model by ``excess`` and the model's minimiser in the region are
both :math:`s(\lambda)_i = -\operatorname{sign}(g_i) \min(\lambda |d_i|, \rho_i)`, with
:math:`d = g` (L2) or :math:`\operatorname{sign}(g)` (Linf) and :math:`\rho_i` the room to the box
in the descent direction (KKT conditions of both problems). Along it the decrease
:math:`-g^\top s(\lambda)` and the norm grow piecewise linearly / quadratically, so the two
:math:`\lambda` are found exactly from the sorted breakpoints; the step is the smaller.

Second order. The quadratic model :math:`m + g^\top s + \tfrac12 s^\top H s` is minimised inside
the region by Steihaug-CG on the coordinates free to move (L2; then projected to the box), or by
projected sign-gradient steps with exact line search in the box :math:`\|s\|_\infty \le r` (Linf),
and the step is then shortened along itself to where the model reaches the target margin.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hessian import steihaug

NORMS = ("l2", "linf")


def room(x: torch.Tensor, g: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Distance to the box boundary in the descent direction ``-sign(g)`` per coordinate (0 where g = 0)."""
    return torch.where(g > 0, x - lo, torch.where(g < 0, hi - x, torch.zeros_like(x))).clamp_min(0.0)


def linear_step(g: torch.Tensor, space: torch.Tensor, excess: torch.Tensor, radius: torch.Tensor | None,
                norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The first-order trust-region step: the minimal-norm step lowering :math:`g^\top s` by ``excess``, capped.

    Args:
        g: margin gradients (B, n).
        space: room to the box in the descent direction (B, n), from :func:`room`.
        excess: the decrease wanted per row (B,).
        radius: the trust radii (B,), or None for no cap.
        norm: ``"l2"`` or ``"linf"``.

    Returns:
        The step s (B, n), inside the box; its predicted decrease :math:`-g^\top s` (B,); and its reach
        :math:`\lambda u`, :math:`u = -g` (L2) or :math:`-\operatorname{sign}(g)` (Linf), the step before
        clipping to the box, so that ``clamp(x + t * reach)`` for t in [0, 1] runs along the path to x + s
        (s itself where the box stops the path first). When the box does not allow the decrease, the step
        goes as far as the box and the radius allow.
    """
    d = g if norm == "l2" else torch.sign(g)
    moving = d != 0
    breaks = torch.where(moving, space / torch.where(moving, d.abs(), 1.0), 0.0)
    lam = _invert(breaks, (g * d).abs(), 1, excess)
    if radius is not None:
        cap = _invert(breaks, d * d, 2, radius**2) if norm == "l2" else radius
        lam = torch.minimum(lam, cap)
    s = torch.where(moving, -torch.sign(g) * torch.minimum(lam[:, None] * d.abs(), space), 0.0)
    reach = torch.where(torch.isfinite(lam)[:, None], -lam[:, None] * torch.sign(g) * d.abs(), s)
    return s, -(g * s).sum(1), reach


def _invert(breaks: torch.Tensor, weights: torch.Tensor, power: int, level: torch.Tensor) -> torch.Tensor:
    r"""Per row the least :math:`\lambda \ge 0` with :math:`F(\lambda) = \sum_i w_i \min(\lambda, \beta_i)^p \ge` level.

    Between consecutive sorted breakpoints :math:`F = C_k + W_k \lambda^p` (C: coordinates already at
    their breakpoint, W: the weight of the others). Infinite where F never reaches the level.
    """
    beta, order = breaks.sort(1)
    w = weights.gather(1, order)
    at_break = w * beta**power
    before = at_break.cumsum(1) - at_break
    after = w.flip(1).cumsum(1).flip(1)
    reached = before + after * beta**power
    k = (reached < level[:, None]).sum(1, keepdim=True)
    inside = k.clamp_max(breaks.shape[1] - 1)
    c, weight = before.gather(1, inside)[:, 0], after.gather(1, inside)[:, 0]
    lam = ((level - c).clamp_min(0.0) / torch.where(weight > 0, weight, 1.0)) ** (1.0 / power)
    lam = torch.where(weight > 0, lam, 0.0)
    return torch.where(k[:, 0] >= breaks.shape[1], torch.inf, torch.where(level > 0, lam, 0.0))


def step_norm(s: torch.Tensor, norm: str) -> torch.Tensor:
    return s.norm(dim=1) if norm == "l2" else s.abs().amax(1)


class _Free:
    """``H`` restricted to the free coordinates: rows ``X`` (B, n) to ``mask * (H @ (mask * X))``."""

    def __init__(self, H: Any, mask: torch.Tensor):
        self.H, self.mask = H, mask
        self.shape, self.dtype, self.device = H.shape, H.dtype, H.device

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.mask * (self.H @ (self.mask * X))


def quadratic_step(H: Any, g: torch.Tensor, x: torch.Tensor, lo: float, hi: float, radius: torch.Tensor, norm: str,
                   max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""A step minimising :math:`g^\top s + \tfrac12 s^\top H s` in the region and the box.

    L2: Steihaug-CG on the coordinates not pinned to the box (at a bound with :math:`-g` pointing out),
    then projected to the box. Linf: :func:`_box_descent` on the box
    :math:`[\max(-r, lo - x), \min(r, hi - x)]`.

    Returns:
        The step s (B, n) and, for the model along it, :math:`a = g^\top s` and :math:`b = s^\top H s` (B,).
    """
    if norm == "l2":
        free = ~(((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0)))
        mask = free.to(g.dtype)
        s = steihaug(_Free(H, mask), g * mask, radius, max_iter=max_iter, tol=1e-3).x
        s = torch.minimum(torch.maximum(s, lo - x), hi - x)
        return s, (g * s).sum(1), (s * (H @ s)).sum(1)
    lower = torch.maximum(-radius[:, None], lo - x)
    upper = torch.minimum(radius[:, None], hi - x)
    return _box_descent(H, g, lower, upper, max_iter)


def _box_descent(H: Any, g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Minimise :math:`q(s) = g^\top s + \tfrac12 s^\top H s` on a box by projected sign steps with exact line search.

    From s = 0, each iteration projects :math:`s - 2r\,\operatorname{sign}(\nabla q)` on the box (the box's
    vertex minimising the linearisation of q at s, a conditional-gradient direction) and moves toward it by
    the :math:`\alpha \in (0, 1]` minimising q on the segment. One product with H per iteration, every
    iterate stays in the box, q never increases, the first iteration is the linear model's minimiser when
    H vanishes, and a row stops once no direction lowers its linearisation.
    """
    s = torch.zeros_like(g)
    grad = g.clone()
    q = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(max_iter):
        vertex = torch.where(grad > 0, lower, torch.where(grad < 0, upper, s))
        d = vertex - s
        slope = (grad * d).sum(1)
        if not bool((slope < 0).any()):
            break
        Hd = H @ d
        curve = (d * Hd).sum(1)
        alpha = torch.where(curve > 0, (-slope / torch.where(curve > 0, curve, 1.0)).clamp(max=1.0), 1.0)
        alpha = torch.where(slope < 0, alpha, 0.0)
        s = s + alpha[:, None] * d
        grad = grad + alpha[:, None] * Hd
        q = q + alpha * slope + 0.5 * alpha**2 * curve
    a = (g * s).sum(1)
    return s, a, 2 * (q - a)


def shorten(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            excess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Shorten s to the first point where the model along it, :math:`-(t a + t^2 b / 2)`, reaches ``excess``.

    Rows whose model decrease at t = 1 is below ``excess`` keep the whole step. The root is
    :math:`t = 2 e / (-a + \sqrt{a^2 - 2 b e})`, the smallest positive one (it exists when the model
    reaches e on (0, 1]).

    Returns:
        The step and its predicted decrease.
    """
    full = -(a + 0.5 * b)
    disc = (a**2 - 2 * b * excess).clamp_min(0.0)
    denom = -a + disc.sqrt()
    t = torch.where((full > excess) & (denom > 0), 2 * excess / torch.where(denom > 0, denom, 1.0), 1.0)
    t = t.clamp(0.0, 1.0)
    return t[:, None] * s, -(t * a + 0.5 * t**2 * b)


def random_step(shape: torch.Size, x: torch.Tensor, lo: float, hi: float, radius: torch.Tensor, norm: str,
                generator: torch.Generator) -> torch.Tensor:
    """A random step of norm ``radius`` per row (Gaussian direction for L2, random signs for Linf), kept in the box."""
    z = torch.randn(shape, generator=generator, dtype=torch.float64).to(x.device)
    direction = z / z.norm(dim=1, keepdim=True) if norm == "l2" else torch.sign(z)
    s = radius[:, None] * direction
    return torch.minimum(torch.maximum(s, lo - x), hi - x)
