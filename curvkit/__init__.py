"""curvkit: second-order optimization and curvature analysis for PyTorch.

One Hessian engine (:mod:`curvkit.hessian`) feeds optimizers (:mod:`curvkit.optim`), analysis
(:mod:`curvkit.analysis`) and compression (:mod:`curvkit.compress`).
"""

__version__ = "0.1.0"
