"""AdaHessian (Yao et al. 2021) as a drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

import math
from typing import Any

from .. import kernels
from ._base import CurvatureOptimizer, Estimator, validate_common


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

    def _update(self, group, params, grads, curvature, next_probes):
        beta1, beta2 = group["betas"]
        states, exp_avg, exp_sq = self._advance(params, "exp_avg", "exp_hessian_diag_sq", ("curvature_updates",))
        bias1, bias2 = [], []
        for st in states:
            if curvature is not None:
                st["curvature_updates"] += 1
            elif st["curvature_updates"] == 0:
                raise RuntimeError("a parameter received a gradient before any curvature estimate; this happens "
                                   "when a parameter joins after the first step with update_each > 1")
            bias1.append(1 - beta1 ** st["step"])
            bias2.append(1 - beta2 ** st["curvature_updates"])
        windows = None
        if curvature is not None and group["spatial_average"]:  # the update averages D over conv kernel windows
            windows = [math.prod(p.shape[2:]) if p.dim() >= 3 else 1 for p in params]
        kernels.adahessian_step_(
            params, grads, exp_avg, exp_sq, curvature.values if curvature else [], group["lr"], beta1, beta2,
            group["eps"], group["weight_decay"], group["hessian_power"], bias1, bias2,
            probes=curvature.probes if curvature else None, windows=windows, next_probes=next_probes,
            probe_seed=self._probe_seed, next_offset=self._probe_offset, fused=self.fused)
