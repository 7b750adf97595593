"""Second-order and curvature-aware optimizers, drop-in ``torch.optim`` optimizers.

AdaHessian and Sophia are built on the Hessian engine; CrAM (:mod:`curvkit.optim.cram`) is
compression-aware training around any first-order optimizer.

.. code-block:: python

    from curvkit.optim import AdaHessian
    opt = AdaHessian(model.parameters(), lr=0.15, seed=0)
    loss = opt.step(lambda: loss_fn(model(x), y))   # the optimizer differentiates; no backward here

Data-parallel training with torch.distributed (DDP cannot double-backward): wrap nothing, keep
one replica per rank, feed each rank its shard, and construct the optimizer after
``init_process_group``. Gradients and curvature estimates are then averaged over ranks with one
all-reduce per step and the probes are identical on every rank (a shared seed), so replicas
stay bit-identical.

Every curvature optimizer offers ``preconditioner()`` (the diagonal P of its step lr * m / P) and
``stability_threshold()``, which :mod:`curvkit.analysis` uses for preconditioned sharpness.

:class:`NewtonCG` and :class:`LocalNewton` (:mod:`curvkit.optim.newton`) are closure-only Newton-CG
methods with an Armijo line search; under torch.distributed they are GIANT and LocalNewton (local
Newton steps between model averagings), with their own communication pattern and counters.
"""

from .adahessian import AdaHessian
from .cram import CrAM
from .estimators import ESTIMATORS, Curvature, DiagonalEstimator, EstimateContext
from .newton import LocalNewton, NewtonCG
from .sophia import Sophia

__all__ = ["AdaHessian", "Sophia", "CrAM", "NewtonCG", "LocalNewton", "ESTIMATORS", "DiagonalEstimator",
           "EstimateContext", "Curvature"]
