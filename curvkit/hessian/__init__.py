"""The Hessian engine: curvature operators and the algorithms that use their products.

>>> from curvkit.hessian import HessianOperator, eigenvalues, trace, diagonal, density
>>> H = HessianOperator(model, F.cross_entropy, (x, y))
>>> eigenvalues(H, k=5).values, trace(H).ci95
"""

from .density import Spectrum, density
from .eigen import eigenvalues
from .lanczos import Lanczos
from .operator import CurvatureOperator, HessianOperator, ModelOperator
from .results import DiagResult, EigResult, TraceResult
from .trace import diagonal, trace

__all__ = [
    "CurvatureOperator", "ModelOperator", "HessianOperator", "Lanczos",
    "eigenvalues", "trace", "diagonal", "density",
    "EigResult", "TraceResult", "DiagResult", "Spectrum",
]
