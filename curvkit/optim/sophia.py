"""Sophia (Liu et al. 2023): a clipped diagonal-Newton optimizer with occasional curvature updates."""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ._diagonal import FUSED_DOC, DiagonalCurvatureOptimizer, validate_common
from .estimators import Estimator


class Sophia(DiagonalCurvatureOptimizer):
    r"""Sophia with a Hutchinson (SophiaH) or Gauss-Newton-Bartlett (SophiaG) curvature estimate.

    :math:`m_t = \mathrm{EMA}_{\beta_1}(g)`; every ``update_each`` steps :math:`h_t = \mathrm{EMA}_{\beta_2}(\hat h)`;

    .. math::

        \theta \leftarrow \theta (1 - \mathrm{lr}\,\mathrm{wd})
            - \mathrm{lr}\,\mathrm{clip}(m_t / \max(\rho h_t, \epsilon), 1)

    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> opt = Sophia(model.parameters(), lr=1e-3, rho=0.04, seed=0)
    >>> loss = opt.step(lambda: F.cross_entropy(model(x), y))                        # SophiaH
    >>> opt = Sophia(model.parameters(), estimator="gnb", seed=0)
    >>> loss = opt.step(lambda: (F.cross_entropy(logits := model(x), y), logits))    # SophiaG

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the largest move of a coordinate per step).
        betas: EMA factors of the gradient and of the curvature.
        rho: the curvature scale (positive).
        weight_decay: decoupled weight decay.
        update_each: refresh the curvature every that many steps.
        estimator: ``"hutchinson"``, ``"gnb"`` or a callable (:mod:`curvkit.optim.estimators`).
        eps: the floor of the denominator (positive).
        n_samples: Hutchinson probes per refresh.
        seed: an int, a ``torch.Generator`` or None (fresh entropy, shared by all ranks).
        fused: see below.
        distributed: average over torch.distributed ranks (None: when a process group is initialised).

    Raises:
        ValueError: a hyperparameter out of range, with what it must be.

    {fused}
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, update_each: int = 10, estimator: Estimator = "hutchinson",
                 eps: float = 1e-12, n_samples: int = 1, seed: Any = None, fused: bool | None = None,
                 distributed: bool | None = None):
        validate_common(lr, betas, weight_decay, update_each, n_samples, fused)
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps, fused=fused)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, estimator=estimator,
                         seed=seed, distributed=distributed)

    def _preconditioner(self, group: dict, state: dict) -> torch.Tensor:
        """P = max(rho h, eps): the unclipped step is lr * m / P (clipped coordinates take sign steps)."""
        return (group["rho"] * state["hessian"].double()).clamp_min(group["eps"])

    def _update(self, group, params, grads, curvature, next_probes):
        beta1, beta2 = group["betas"]
        _, exp_avg, hessian = self._init_and_count_state(params, "exp_avg", "hessian")
        kernels.sophia_step_(params, grads, exp_avg, hessian, curvature.values if curvature else [], group["lr"],
                             beta1, beta2, group["rho"], group["eps"], group["weight_decay"],
                             probes=curvature.probes if curvature else None, next_probes=next_probes,
                             probe_seed=self._probe_seed, next_offset=self._probe_offset, fused=group["fused"])


Sophia.__doc__ = Sophia.__doc__.replace("{fused}", FUSED_DOC)
