"""Result records of the curvature algorithms: small dataclasses of tensors and floats."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _short(t: torch.Tensor, width: int = 5) -> str:
    vals = ", ".join(f"{v:.6g}" for v in t.flatten()[:width].tolist())
    return f"[{vals}{', ...' if t.numel() > width else ''}]"


@dataclass(repr=False)
class EigResult:
    """Ritz pairs from Lanczos: ``values[i]`` with eigenvector ``vectors[:, i]``.

    ``residuals[i] = ||H y_i - theta_i y_i||``; ``converged`` is True only if every requested pair met
    the tolerance; ``matvecs`` counts Hessian-vector products.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    matvecs: int

    def __repr__(self) -> str:
        return (f"EigResult(values={_short(self.values)}, residuals={_short(self.residuals)}, "
                f"converged={self.converged}, matvecs={self.matvecs})")


@dataclass(repr=False)
class TraceResult:
    """A trace estimate with its standard error and a 95% confidence interval ``(low, high)``.

    ``converged`` says whether the relative standard error reached ``rtol`` within the budget.
    """

    estimate: float
    stderr: float
    ci95: tuple[float, float]
    matvecs: int
    method: str = "hutchinson"
    converged: bool = True

    def __repr__(self) -> str:
        return (f"TraceResult(estimate={self.estimate:.6g} +- {self.stderr:.2g}, "
                f"ci95=({self.ci95[0]:.6g}, {self.ci95[1]:.6g}), matvecs={self.matvecs}, "
                f"method={self.method!r}, converged={self.converged})")


@dataclass(repr=False)
class DiagResult:
    """An estimate of diag(H) (flat, parameter order) with per-entry standard errors."""

    estimate: torch.Tensor
    stderr: torch.Tensor
    matvecs: int

    def __repr__(self) -> str:
        return (f"DiagResult(estimate={_short(self.estimate)}, max stderr={self.stderr.max().item():.3g}, "
                f"matvecs={self.matvecs})")


def _flags(t: torch.Tensor) -> str:
    """A bool per row as ``True``/``False`` (one row) or ``k/B`` (how many of B rows are True)."""
    return str(bool(t)) if t.dim() == 0 else f"{int(t.sum())}/{t.numel()}"


@dataclass(repr=False)
class SolveResult:
    """The solution of a linear system or trust-region sub-problem (``cg``, ``steihaug``), row by row.

    ``x`` has the right-hand side's shape; the other fields hold one entry per row (0-dim tensors for a
    flat ``(n,)`` problem): ``residual`` is the final relative residual (``||b - A x|| / ||b||`` for cg,
    ``||g + A x|| / ||g||`` for steihaug), ``iterations`` the products with A that row used,
    ``negative_curvature`` whether it met a direction with ``p^T A p <= 0``, and ``converged`` whether
    it stopped on its own criterion rather than at ``max_iter``.
    """

    x: torch.Tensor
    residual: torch.Tensor
    iterations: torch.Tensor
    negative_curvature: torch.Tensor
    converged: torch.Tensor

    def __repr__(self) -> str:
        return (f"SolveResult(x={_short(self.x)}, residual={_short(self.residual)}, "
                f"iterations={_short(self.iterations)}, negative_curvature={_flags(self.negative_curvature)}, "
                f"converged={_flags(self.converged)})")


@dataclass(repr=False)
class CheckResult:
    """Products against finite differences of first derivatives (:func:`~curvkit.hessian.check`).

    ``rel_error`` is the largest relative difference over ``probes`` random unit probes, ``ok`` says
    whether it is at most ``tol``; ``step`` is the relative step of the central differences.
    """

    rel_error: float
    tol: float
    ok: bool
    probes: int
    step: float

    def __repr__(self) -> str:
        return (f"CheckResult(rel_error={self.rel_error:.3g}, tol={self.tol:.3g}, ok={self.ok}, "
                f"probes={self.probes}, step={self.step:.3g})")
