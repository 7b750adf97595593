"""AdaHessian (Yao et al. 2021) as a drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import kernels
from ._diagonal import FUSED_DOC, DiagonalCurvatureOptimizer, validate_common
from .estimators import Estimator


class AdaHessian(DiagonalCurvatureOptimizer):
    r"""AdaHessian: Adam with the squared gradient replaced by a squared Hessian-diagonal estimate.

    With :math:`D_t = z \odot (H z)` (Rademacher z; signed, averaged over conv kernel windows when
    ``spatial_average``), :math:`m_t = \mathrm{EMA}_{\beta_1}(g)` and :math:`v_t = \mathrm{EMA}_{\beta_2}(D^2)`
    updated every ``update_each`` steps,

    .. math::

        \theta \leftarrow \theta (1 - \mathrm{lr}\,\mathrm{wd})
            - \mathrm{lr} \frac{m_t / (1 - \beta_1^t)}{(v_t / (1 - \beta_2^s))^{k/2} + \epsilon}

    where s counts the curvature updates actually made and k is ``hessian_power``. Note
    :math:`E[D_i^2] = \|H_{i,:}\|^2`: the denominator tracks Hessian row norms.

    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> opt = AdaHessian(model.parameters(), lr=0.15, seed=0)
    >>> loss = opt.step(lambda: F.cross_entropy(model(x), y))   # no backward in the closure

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: EMA factors of the gradient and of the squared curvature.
        eps: added to the denominator (positive; a tiny eps makes first steps explode).
        weight_decay: decoupled weight decay.
        hessian_power: k in [0, 1].
        update_each: refresh the curvature every that many steps (the gradient is used every step).
        n_samples: Hutchinson probes per refresh.
        spatial_average: average D over each conv kernel window (the paper's choice).
        seed: an int, a ``torch.Generator`` or None (fresh entropy, shared by all ranks) for the probes.
        fused: see below.
        estimator: ``"hutchinson"``, ``"gnb"`` or a callable (:mod:`curvkit.optim.estimators`).
        distributed: average over torch.distributed ranks (None: when a process group is initialised).

    Raises:
        ValueError: a hyperparameter out of range, with what it must be.

    {fused}
    """

    def __init__(self, params, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, update_each: int = 1, n_samples: int = 1,
                 spatial_average: bool = True, seed: Any = None, fused: bool | None = None,
                 estimator: Estimator = "hutchinson", distributed: bool | None = None):
        validate_common(lr, betas, weight_decay, update_each, n_samples, fused)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r} (a tiny eps such as 1e-16 makes first steps explode)")
        if not 0 <= hessian_power <= 1:
            raise ValueError(f"hessian_power must be in [0, 1], got {hessian_power!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        spatial_average=spatial_average, fused=fused)
        super().__init__(params, defaults, update_each=update_each, n_samples=n_samples, estimator=estimator,
                         seed=seed, distributed=distributed)

    def _preconditioner(self, group: dict, state: dict) -> torch.Tensor:
        """P = (1 - b1^t) ((v / (1 - b2^s))^(k/2) + eps): the step is lr * m / P."""
        b1, b2 = group["betas"]
        v = state["exp_hessian_diag_sq"] / (1 - b2 ** state["curvature_updates"])
        return (1 - b1 ** state["step"]) * (v.double() ** (group["hessian_power"] / 2) + group["eps"])

    def _update(self, group, params, grads, curvature, next_probes):
        beta1, beta2 = group["betas"]
        states, exp_avg, exp_sq = self._init_and_count_state(params, "exp_avg", "exp_hessian_diag_sq",
                                                             ("curvature_updates",))
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
            probe_seed=self._probe_seed, next_offset=self._probe_offset, fused=group["fused"])


AdaHessian.__doc__ = AdaHessian.__doc__.replace("{fused}", FUSED_DOC)
