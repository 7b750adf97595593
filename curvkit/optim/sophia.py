"""Sophia (Liu et al. 2023): a clipped diagonal-Newton optimizer with occasional curvature updates."""

from __future__ import annotations

from typing import Any

from .. import kernels
from ._base import CurvatureOptimizer, Estimator, validate_common


class Sophia(CurvatureOptimizer):
    r"""Sophia with a Hutchinson (SophiaH) or Gauss-Newton-Bartlett (SophiaG) curvature estimate.

    m_t = EMA_{b1}(g); every ``update_each`` steps h_t = EMA_{b2}(hhat);
    .. math:: \theta \leftarrow \theta (1 - lr\,wd) - lr\,\mathrm{clip}(m_t / \max(\rho h_t, eps), 1)

    >>> opt = Sophia(model.parameters(), lr=1e-3, rho=0.04, seed=0)
    >>> opt.step(lambda: loss_fn(model(x), y))                              # SophiaH
    >>> opt = Sophia(model.parameters(), estimator="gnb")
    >>> opt.step(lambda: (loss_fn(logits := model(x), y), logits))          # SophiaG

    ``fused=None`` runs the update of a parameter group as one call of curvkit's compiled kernel where
    it is built, ``True`` requires it, ``False`` runs torch's foreach ops (same probes, same results).
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
                         seed=seed, distributed=distributed, fused=fused)

    def _update(self, group, params, grads, curvature, next_probes):
        beta1, beta2 = group["betas"]
        _, exp_avg, hessian = self._advance(params, "exp_avg", "hessian")
        kernels.sophia_step_(params, grads, exp_avg, hessian, curvature.values if curvature else [], group["lr"],
                             beta1, beta2, group["rho"], group["eps"], group["weight_decay"],
                             probes=curvature.probes if curvature else None, next_probes=next_probes,
                             probe_seed=self._probe_seed, next_offset=self._probe_offset, fused=self.fused)
