"""AdaHessian (Yao et al. 2021) as a drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ._base import CurvatureOptimizer, Estimator, validate_common


def _window_mean(d: torch.Tensor) -> torch.Tensor:
    """Mean of a diagonal estimate over the kernel window of a conv weight (dims 2.., kept as size 1)."""
    return d if d.dim() < 3 else d.mean(dim=tuple(range(2, d.dim())), keepdim=True)


def spatial_average(d: torch.Tensor) -> torch.Tensor:
    """Average a diagonal estimate over the kernel window of a conv weight (dims 2.., any rank)."""
    return d if d.dim() < 3 else _window_mean(d).expand_as(d)


class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian: Adam with the squared gradient replaced by a squared Hessian-diagonal estimate.

    With D_t = z * (H z) (Rademacher z; signed, averaged over conv kernel windows),
    m_t = EMA_{b1}(g), v_t = EMA_{b2}(D^2) updated every ``update_each`` steps,
    .. math:: \theta \leftarrow \theta (1 - lr\,wd) - lr \frac{m_t / (1 - b_1^t)}{(v_t / (1 - b_2^{s}))^{k/2} + eps}
    where s counts the curvature updates actually made and k is ``hessian_power``.
    Note E[D_i^2] = ||H_{i,:}||^2: the denominator tracks Hessian row norms.

    ``fused=None`` runs the whole update of a parameter group as one call of curvkit's compiled
    kernel where it is built (CPU, CUDA), ``True`` requires it, ``False`` runs torch's foreach ops;
    both draw the same Philox probes and agree to rounding.

    >>> opt = AdaHessian(model.parameters(), lr=0.15, seed=0)
    >>> loss = opt.step(lambda: loss_fn(model(x), y))     # no backward in the closure
    """

    def __init__(self, params, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, update_each: int = 1, n_samples: int = 1,
                 spatial_average: bool = True, seed: Any = None, fused: bool | None = None,
                 estimator: Estimator = "hutchinson", distributed: bool | None = None):
        validate_common(lr, betas, weight_decay, update_each, n_samples, estimator, fused)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r} (a tiny eps such as 1e-16 makes first steps explode)")
        if not 0 <= hessian_power <= 1:
            raise ValueError(f"hessian_power must be in [0, 1], got {hessian_power!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        spatial_average=spatial_average)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, estimator=estimator,
                         seed=seed, distributed=distributed, fused=fused)

    def _update(self, group, params, grads, curvature):
        beta1, beta2 = group["betas"]
        states = self._advance(params, ("exp_avg", "exp_hessian_diag_sq"), ("curvature_updates",))
        if curvature is not None:
            if group["spatial_average"]:
                curvature = [_window_mean(d) for d in curvature]  # the update spreads it over the window
            for st in states:
                st["curvature_updates"] += 1
        if any(st["curvature_updates"] == 0 for st in states):
            raise RuntimeError("a parameter received a gradient before any curvature estimate; "
                               "this happens when a parameter joins after the first step with update_each > 1")
        kernels.adahessian_step_(
            params, grads, [st["exp_avg"] for st in states], [st["exp_hessian_diag_sq"] for st in states],
            curvature or [], group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["hessian_power"],
            [1 - beta1 ** st["step"] for st in states], [1 - beta2 ** st["curvature_updates"] for st in states],
            fused=self.fused)
