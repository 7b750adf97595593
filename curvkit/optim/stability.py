r"""Stability thresholds and diagonal preconditioners of optimizers, for edge-of-stability analysis.

For gradient descent the stability threshold is 2/lr (Cohen et al. 2021); heavy-ball momentum b:
(2 + 2b)/lr; Nesterov: (2 + 2b)/((1 + 2b) lr). Adaptive optimizers precondition the step with P, and
what hovers at the threshold is the preconditioned sharpness lambda_max(P^-1 H) (Cohen et al. 2022).
Adam/AdamW: P = (1 - b1^t) diag(sqrt(v_t / (1 - b2^t)) + eps), threshold (2 + 2 b1) / ((1 - b1) lr);
RMSprop: P = diag(sqrt(v_t) + eps) (centred: v_t - g_t^2), threshold (2 + 2b)/lr with momentum b.
curvkit's optimizers state their own (``stability_threshold()``, ``preconditioner()``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64)


def _per_lr(c: float, lr: float) -> float:
    """The threshold c / lr; inf at lr 0 (the end of a schedule that decays to zero), where nothing is unstable."""
    return c / lr if lr else math.inf


def stability(optimizer: torch.optim.Optimizer | None,
              params: Sequence[torch.Tensor]) -> tuple[float, torch.Tensor | None]:
    """The optimizer's stability threshold and, for adaptive optimizers, the diagonal preconditioner P.

    curvkit's optimizers say both themselves (``stability_threshold()``, ``preconditioner(params)``);
    for ``torch.optim`` SGD, Adam, AdamW and RMSprop the formulas of the module docstring apply.

    Args:
        optimizer: the optimizer (None: no threshold).
        params: the parameters P must cover, in order.

    Returns:
        ``(threshold, P)``: ``(nan, None)`` for optimizers without a known threshold; ``P`` (flat, float64)
        is None for non-adaptive optimizers and until the optimizer has state for every parameter of ``H``.
    """
    if optimizer is None:
        return float("nan"), None
    if hasattr(optimizer, "preconditioner") and hasattr(optimizer, "stability_threshold"):
        return float(optimizer.stability_threshold()), optimizer.preconditioner(params)
    group = optimizer.param_groups[0]
    lr = group["lr"]
    state = [optimizer.state.get(p, {}) for p in params]
    ready = bool(state) and all(state)
    if isinstance(optimizer, torch.optim.SGD):
        b = group.get("momentum", 0.0)
        if group.get("nesterov", False):
            return _per_lr((2 + 2 * b) / (1 + 2 * b), lr), None
        return _per_lr(2 + 2 * b, lr), None
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        b1, b2 = group["betas"]
        if not ready:
            return _per_lr((2 + 2 * b1) / (1 - b1), lr), None
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        P = []
        for st in state:
            t = float(st["step"])
            P.append((1 - b1**t) * ((st[key] / (1 - b2**t)).sqrt() + group["eps"]))
        return _per_lr((2 + 2 * b1) / (1 - b1), lr), _flat(P)
    if isinstance(optimizer, torch.optim.RMSprop):
        b = group.get("momentum", 0.0)
        if not ready:
            return _per_lr(2 + 2 * b, lr), None
        P = [((st["square_avg"] - st["grad_avg"] ** 2) if group.get("centered") else st["square_avg"]).sqrt()
             + group["eps"] for st in state]
        return _per_lr(2 + 2 * b, lr), _flat(P)
    return float("nan"), None


