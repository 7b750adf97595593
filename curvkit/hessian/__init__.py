"""The Hessian engine: curvature operators and the algorithms that use their products.

Operators (:class:`HessianOperator`, :class:`GGNOperator`, :class:`PreconditionedOperator`, and the
compositions ``H.shift(c)``, ``a * H``) know how to multiply; algorithms (:func:`eigenvalues`,
:func:`trace`, :func:`diagonal`, :func:`density`, :func:`layerwise`) know what to do with products and
run on any object with ``shape``, ``dtype``, ``device`` and ``@``, dense tensors included. :func:`check`
compares a model operator's products with finite differences of first derivatives.

.. code-block:: python

    from curvkit.hessian import HessianOperator, eigenvalues, trace
    H = HessianOperator(model, F.cross_entropy, (x, y))
    eigenvalues(H, k=5).values, trace(H).ci95
"""

from .._utils.borrow import twice_differentiable
from .check import check
from .closure import ClosureHessianOperator
from .density import Spectrum, density
from .diagonal import diagonal
from .eigen import eigenvalues
from .factory import OPERATORS, build_operator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .inputs import InputHessianOperator, input_hvp
from .lanczos import Lanczos, SegmentedLanczos
from .layerwise import layerwise
from .model import ModelOperator
from .operator import AffineOperator, CurvatureOperator, DiagonalSandwich
from .preconditioned import PreconditionedOperator
from .results import CheckResult, DiagResult, EigResult, SolveResult, TraceResult
from .solve import cg, steihaug
from .trace import trace

__all__ = [
    "CurvatureOperator", "ModelOperator", "HessianOperator", "GGNOperator", "PreconditionedOperator",
    "AffineOperator", "DiagonalSandwich", "OPERATORS", "build_operator",
    "Lanczos", "SegmentedLanczos", "eigenvalues", "trace", "diagonal", "density", "layerwise", "input_hvp",
    "InputHessianOperator", "ClosureHessianOperator", "cg", "steihaug", "check", "twice_differentiable",
    "EigResult", "TraceResult", "DiagResult", "SolveResult", "CheckResult", "Spectrum",
]
