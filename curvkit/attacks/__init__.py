"""Adversarial attacks built on the Hessian engine.

.. code-block:: python

    from curvkit.attacks import trust_region

    res = trust_region(model, x, y, norm="l2", order=1, confidence=0.5)
    res.adversarial, res.success, res.norms, res.margins, res.iterations
"""

from .results import AttackResult
from .trust_region import trust_region

__all__ = ["trust_region", "AttackResult"]
