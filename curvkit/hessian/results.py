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
