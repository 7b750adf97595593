r"""Edge-of-stability tracking: sharpness and preconditioned sharpness against the optimizer's threshold.

Sharpness is the top Hessian eigenvalue lambda_max(H) on fixed data; for gradient descent it rises to
the stability threshold 2/lr and hovers there (Cohen et al. 2021). Adaptive optimizers precondition the
step with P, and what hovers at their threshold is the preconditioned sharpness lambda_max(P^-1 H),
computed as the top eigenvalue of the symmetric P^-1/2 H P^-1/2 (Cohen et al. 2022). The thresholds and
preconditioners are the optimizers' knowledge: :mod:`curvkit.optim.stability`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils.random import Seed, make_generator
from ..hessian import PreconditionedOperator, build_operator, eigenvalues
from ..hessian.factory import OperatorSpec
from ..optim.stability import stability as optimizer_stability

COLUMNS = ["step", "loss", "sharpness", "preconditioned_sharpness", "threshold", "matvecs", "seconds"]


def stability(optimizer: torch.optim.Optimizer | None, H: Any) -> tuple[float, torch.Tensor | None]:
    """The optimizer's stability threshold and, for adaptive optimizers, its diagonal preconditioner P over ``H``.

    See :func:`curvkit.optim.stability.stability` (the formulas are the optimizers' knowledge).

    Args:
        optimizer: the optimizer (None: no threshold).
        H: the operator whose ``params`` P must cover, in order.

    Returns:
        ``(threshold, P)``: ``(nan, None)`` for optimizers without a known threshold; ``P`` (flat, float64)
        is None for non-adaptive optimizers and until the optimizer has state for every parameter of ``H``.
    """
    return optimizer_stability(optimizer, H.params)


class SharpnessTracker:
    r"""Record loss, sharpness and preconditioned sharpness every ``every`` steps during training.

    Each measurement builds the Hessian on the fixed ``data`` at the current weights and runs
    Lanczos warm-started from the previous top eigenvector (few products once training is smooth).
    ``history`` is a DataFrame; ``seconds`` is the tracker's own time per measurement and
    :attr:`overhead` its share of the wall time since the first call.

    .. code-block:: python

        tracker = SharpnessTracker(model, F.mse_loss, (x, y), optimizer=opt, every=20)
        for _ in range(steps):
            opt.step(closure)
            tracker.step()
        tracker.plot().savefig("sharpness.png")

    Args:
        model: the model being trained (borrowed, never changed by the tracker).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: the fixed batch (or batches) the curvature is measured on.
        optimizer: the optimizer, for its threshold and preconditioner (None: sharpness only).
        every: measure on the first call and every that many calls after.
        k: eigenvalues per Lanczos run (the top one is recorded).
        tol: the eigenvalue's relative error bound.
        max_matvecs: the product budget per measurement.
        seed: the start vectors' seed.
        operator: ``"hessian"``, ``"ggn"`` (GGN sharpness) or a factory ``operator(model, loss_fn, data, **kw)``.
        **operator_kwargs: passed to the operator (``params``, ``bn_mode``, ...).

    Raises:
        ValueError: ``every`` is not a positive integer.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, optimizer: torch.optim.Optimizer | None = None,
                 every: int = 20, k: int = 1, *, tol: float = 1e-3, max_matvecs: int | None = None, seed: Seed = 0,
                 operator: OperatorSpec = "hessian", **operator_kwargs: Any):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.operator = operator
        self.model, self.loss_fn, self.data, self.optimizer = model, loss_fn, data, optimizer
        self.every, self.k, self.tol, self.max_matvecs, self.seed = every, k, tol, max_matvecs, seed
        self._operator_kwargs = operator_kwargs
        self._rows: list[dict] = []
        self._calls = 0
        self._start: float | None = None
        self._own = 0.0
        self._v0: dict[str, torch.Tensor | None] = {"raw": None, "pre": None}
        self._probe_seed = seed if isinstance(seed, int) else 0

    @property
    def history(self) -> pd.DataFrame:
        """One row per measurement: step, loss, sharpness, preconditioned sharpness, threshold, products, seconds."""
        return pd.DataFrame(self._rows, columns=COLUMNS)

    @property
    def overhead(self) -> float:
        """Share of the wall time since the first :meth:`step` spent inside the tracker."""
        if self._start is None:
            return 0.0
        return self._own / max(time.perf_counter() - self._start, 1e-12)

    def _top(self, H: Any, key: str) -> float:
        """Top eigenvalue, warm-started from the last eigenvector mixed with a fresh random vector.

        The random part lets an eigenvalue that overtakes the previous top one enter the Krylov space.
        """
        v0 = self._v0[key]
        if v0 is not None:
            self._probe_seed += 1
            noise = torch.randn(v0.shape, generator=make_generator(self._probe_seed), dtype=v0.dtype).to(v0.device)
            v0 = v0 + 0.5 * noise / noise.norm()
        res = eigenvalues(H, k=self.k, tol=self.tol, max_matvecs=self.max_matvecs, seed=self.seed, v0=v0,
                          progress=False)
        self._v0[key] = res.vectors[:, 0]
        return float(res.values[0])

    def step(self) -> dict | None:
        """Call once per training step; measures on the first call and every ``every`` calls after."""
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        self._calls += 1
        if (self._calls - 1) % self.every:
            return None
        H = build_operator(self.operator, self.model, self.loss_fn, self.data, **self._operator_kwargs)
        threshold, P = stability(self.optimizer, H)
        row = {"step": self._calls - 1, "loss": H.loss() if hasattr(H, "loss") else np.nan,  # a factory's may not
               "sharpness": self._top(H, "raw"),
               "preconditioned_sharpness": np.nan, "threshold": threshold}
        if P is not None:
            row["preconditioned_sharpness"] = self._top(PreconditionedOperator(H, P), "pre")
        row["matvecs"] = H.matvecs
        row["seconds"] = time.perf_counter() - now
        self._own += row["seconds"]
        self._rows.append(row)
        return row

    def plot(self, ax=None):
        """Loss (top) and sharpness with the stability threshold (bottom) against the training step."""
        import matplotlib.pyplot as plt

        df = self.history
        if ax is None:
            fig, (ax_loss, ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
            ax_loss.plot(df["step"], df["loss"], color="k")
            title = "Loss and sharpness during training"
            if self.optimizer is not None:
                title += f" ({type(self.optimizer).__name__}, lr={self.optimizer.param_groups[0]['lr']:g})"
            ax_loss.set(ylabel="training loss", yscale="log", title=title)
            ax_loss.grid(alpha=0.3)
        adaptive = df["preconditioned_sharpness"].notna().any()
        ax.plot(df["step"], df["sharpness"], label="sharpness  $\\lambda_{max}(H)$")
        if adaptive:
            ax.plot(df["step"], df["preconditioned_sharpness"],
                    label="preconditioned sharpness  $\\lambda_{max}(P^{-1}H)$")
        if df["threshold"].notna().any():
            ax.plot(df["step"], df["threshold"], "k--", label="stability threshold" + (
                " (for preconditioned)" if adaptive else " (2/lr for GD)"))
        ax.set(xlabel="training step", ylabel="top eigenvalue", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
        return ax.figure
