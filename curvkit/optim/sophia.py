"""Sophia (Liu et al. 2023): a clipped diagonal-Newton optimizer with occasional curvature updates."""

from __future__ import annotations

from typing import Any

import torch

from ._base import CurvatureOptimizer, Estimator, validate_common


class Sophia(CurvatureOptimizer):
    r"""Sophia with a Hutchinson (SophiaH) or Gauss-Newton-Bartlett (SophiaG) curvature estimate.

    m_t = EMA_{b1}(g); every ``update_each`` steps h_t = EMA_{b2}(hhat);
    .. math:: \theta \leftarrow \theta (1 - lr\,wd) - lr\,\mathrm{clip}(m_t / \max(\rho h_t, eps), 1)

    >>> opt = Sophia(model.parameters(), lr=1e-3, rho=0.04, seed=0)
    >>> opt.step(lambda: loss_fn(model(x), y))                              # SophiaH
    >>> opt = Sophia(model.parameters(), estimator="gnb")
    >>> opt.step(lambda: (loss_fn(logits := model(x), y), logits))          # SophiaG
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, update_each: int = 10, estimator: Estimator = "hutchinson",
                 eps: float = 1e-12, n_samples: int = 1, seed: Any = None, fused: bool | None = None,
                 distributed: bool | None = None):
        validate_common(lr, betas, weight_decay, update_each, n_samples, estimator, fused)
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, estimator=estimator,
                         seed=seed, distributed=distributed)

    def _update(self, group, params, grads, curvature):
        beta1, beta2 = group["betas"]
        states = self._advance(params, ("exp_avg", "hessian"))
        exp_avg = [st["exp_avg"] for st in states]
        hessian = [st["hessian"] for st in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        if curvature is not None:
            torch._foreach_mul_(hessian, beta2)
            torch._foreach_add_(hessian, curvature, alpha=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denom = torch._foreach_mul(hessian, group["rho"])
        torch._foreach_clamp_min_(denom, group["eps"])
        ratio = torch._foreach_div(exp_avg, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(params, ratio, alpha=-group["lr"])
