"""The Hessian engine: curvature operators and the algorithms that use their products.

>>> from curvkit.hessian import HessianOperator, eigenvalues, trace, diagonal, density
>>> H = HessianOperator(model, F.cross_entropy, (x, y))
>>> eigenvalues(H, k=5).values, trace(H).ci95
"""

from .density import Spectrum, density
from .eigen import eigenvalues
from .ggn import GGNOperator
from .inputs import InputHessianOperator, input_hvp
from .lanczos import Lanczos, SegmentedLanczos
from .layerwise import layerwise
from .operator import CurvatureOperator, HessianOperator, ModelOperator
from .preconditioned import PreconditionedOperator
from .results import DiagResult, EigResult, SolveResult, TraceResult
from .solve import cg, steihaug
from .trace import diagonal, trace

__all__ = [
    "CurvatureOperator", "ModelOperator", "HessianOperator", "Lanczos",
    "eigenvalues", "trace", "diagonal", "density", "layerwise", "SegmentedLanczos",
    "EigResult", "TraceResult", "DiagResult", "Spectrum",
    "GGNOperator", "PreconditionedOperator", "input_hvp", "InputHessianOperator", "cg", "steihaug", "SolveResult",
]
