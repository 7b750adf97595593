"""When and how the framework callbacks measure sharpness: a ``SharpnessTracker`` at chosen training steps."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from .._utils.borrow import preserved_modes
from ..analysis.sharpness import COLUMNS, SharpnessTracker
from ._graph import unwrap


class SharpnessProbe:
    """Measures after optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ... and once at the last one.

    Each measurement runs the tracker with the model in eval mode (dropout off, so the Hessian is
    deterministic; BatchNorm as ``bn_mode`` says) and restores every module's mode afterwards; parameters,
    buffers and ``.grad`` are never touched. ``history`` has one tracker row per measurement, ``step``
    being the optimizer step.
    """

    def __init__(self, loss_fn: Any, data: Any, every_n_steps: int, preconditioned: bool, tracker_kwargs: dict):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if not isinstance(preconditioned, bool):
            raise ValueError(f"preconditioned must be True or False, got {preconditioned!r}")
        if "every" in tracker_kwargs or "optimizer" in tracker_kwargs:
            raise ValueError("pass every_n_steps and preconditioned; the callback chooses the tracker's every and "
                             "optimizer itself")
        self.loss_fn, self.data = loss_fn, data
        self.every_n_steps, self.preconditioned = every_n_steps, preconditioned
        self.tracker_kwargs = tracker_kwargs
        self._tracker: SharpnessTracker | None = None
        self._last: int | None = None

    @property
    def history(self) -> pd.DataFrame:
        """One row per measurement (the tracker's columns; ``step`` is the optimizer step)."""
        return self._tracker.history if self._tracker is not None else pd.DataFrame(columns=COLUMNS)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one to measure after and has not been measured."""
        return step > 0 and step != self._last and step % self.every_n_steps == 0

    def missed(self, step: int) -> bool:
        """Whether the model after optimizer step ``step`` (the last) is still unmeasured."""
        return step > 0 and step != self._last

    def measure(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> dict[str, float]:
        """Sharpness (and, when preconditioned, preconditioned sharpness and stability threshold) of ``model`` now.

        Values that do not exist (no preconditioner for a non-adaptive optimizer) are left out.
        """
        optimizer = unwrap(optimizer) if self.preconditioned and optimizer is not None else None
        tracker = self._tracker
        if tracker is None or tracker.model is not model or tracker.optimizer is not optimizer:
            tracker = self._tracker = SharpnessTracker(model, self.loss_fn, self.data, optimizer=optimizer, every=1,
                                                       **self.tracker_kwargs)
        with preserved_modes(model):
            model.eval()
            row = tracker.step()
        row["step"] = step  # the row is the tracker's own record: its history counts optimizer steps
        self._last = step
        keys = ("sharpness", "preconditioned_sharpness", "threshold") if self.preconditioned else ("sharpness",)
        names = {"threshold": "stability_threshold"}
        return {names.get(k, k): float(row[k]) for k in keys if not math.isnan(row[k])}
