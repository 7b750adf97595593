r"""Loss landscapes: L(theta + a d1 + b d2) on a grid, evaluated from the stored weights.

Every grid point is evaluated at absolute coordinates from the model's current weights theta
(the centre), with ``torch.func.functional_call`` on copies, so the model is never displaced.
Grid points are batched with ``torch.func.vmap`` (many points per forward call); over a dataset
the loss is the sample-weighted mean over batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._utils.batches import as_batches, batch_size, empty_data_error, to_device
from .._utils.borrow import BorrowedLoss
from .._utils.progress import progress_bar
from .directions import Direction

KINDS = ("contour", "surface", "heatmap")


@dataclass(repr=False)
class Landscape:
    """Loss values on a grid: ``loss[i]`` at theta + x[i] d (1-D) or ``loss[i, j]`` at theta + x[i] d1 + y[j] d2."""

    x: np.ndarray
    loss: np.ndarray
    y: np.ndarray | None = None
    label: str = "loss"

    def __repr__(self) -> str:
        grid = f"{len(self.x)}" if self.y is None else f"{len(self.x)}x{len(self.y)}"
        return (f"Landscape({grid} grid, x in [{self.x[0]:.3g}, {self.x[-1]:.3g}], "
                f"loss in [{np.nanmin(self.loss):.4g}, {np.nanmax(self.loss):.4g}])")

    def plot(self, kind: str = "contour", log: bool = False, ax=None):
        """A matplotlib Figure: a line for 1-D; ``"contour"``, ``"surface"`` or ``"heatmap"`` for 2-D."""
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        if self.y is None:
            if ax is None:
                _, ax = plt.subplots(figsize=(6, 4))
            ax.plot(self.x, self.loss)
            ax.axvline(0.0, color="grey", lw=0.8, ls="--", label="trained weights")
            ax.set(xlabel="step along the direction", ylabel=self.label, title=f"1-D loss landscape ({self.label})")
            if log:
                ax.set_yscale("log")
            ax.legend()
            return ax.figure
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        X, Y = np.meshgrid(self.x, self.y, indexing="ij")
        Z = self.loss
        norm = LogNorm(vmin=max(np.nanmin(Z[Z > 0]) if (Z > 0).any() else 1e-12, 1e-12), vmax=np.nanmax(Z)) if log \
            else None
        if kind == "surface":
            if ax is None:
                fig = plt.figure(figsize=(7, 5))
                ax = fig.add_subplot(projection="3d")
            surf = ax.plot_surface(X, Y, np.log10(Z) if log else Z, cmap="viridis")
            ax.set_zlabel(f"log10 {self.label}" if log else self.label)
            ax.figure.colorbar(surf, ax=ax, shrink=0.6, pad=0.12, format="%.3g")
        else:
            if ax is None:
                _, ax = plt.subplots(figsize=(6, 5))
            if kind == "heatmap":
                mesh = ax.pcolormesh(X, Y, Z, cmap="viridis", norm=norm, shading="auto")
            else:
                levels = np.geomspace(norm.vmin, norm.vmax, 30) if log else 30
                mesh = ax.contourf(X, Y, Z, levels=levels, cmap="viridis", norm=norm)
                ax.contour(X, Y, Z, levels=levels, colors="k", linewidths=0.3, norm=norm)
            ax.figure.colorbar(mesh, ax=ax, label=self.label + (" (log scale)" if log else ""), format="%.3g")
            ax.plot(0, 0, "r*", ms=10, label="trained weights")
            ax.legend(loc="upper right")
        ax.set(xlabel="direction 1", ylabel="direction 2", title=f"2-D loss landscape ({self.label})")
        return ax.figure


def _stack(model: nn.Module, directions: list[Direction]) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Parameter names, centre tensors, and directions stacked as (n_dirs, *shape) per parameter."""
    named = dict(model.named_parameters())
    for d in directions:
        unknown = set(d) - set(named)
        if unknown:
            raise ValueError(f"direction entries {sorted(unknown)[:3]} are not parameters of the model")
        for name, t in d.items():
            if t.shape != named[name].shape:
                raise ValueError(f"direction {name!r} has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(named[name].shape)}")
    names = list(named)
    centre = [named[n].detach() for n in names]
    stacked = [torch.stack([d[n].to(c) if n in d else torch.zeros_like(c) for d in directions]) for n, c in
               zip(names, centre)]
    return names, centre, stacked


def evaluate_grid(model: nn.Module, loss_fn: Any, data: Any, directions: list[Direction], coords: np.ndarray, *,
                  points_per_call: int | None = None, forward: Any = None, bn_mode: str = "eval",
                  progress: bool | None = None) -> np.ndarray:
    r"""Mean loss at theta + sum_k coords[p, k] directions[k] for every row p of ``coords``."""
    names, centre, stacked = _stack(model, directions)
    loss = BorrowedLoss(model, loss_fn, names, forward=forward, bn_mode=bn_mode)
    coords_t = torch.as_tensor(np.asarray(coords, dtype=np.float64))
    n_points = coords_t.shape[0]
    n_params = sum(c.numel() for c in centre)
    chunk = points_per_call or max(1, min(n_points, 64, 2**25 // max(n_params, 1)))
    batches = as_batches(data)
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    total = torch.zeros(n_points, dtype=torch.float64)
    count = 0
    with progress_bar(total=n_batches and n_points * n_batches, desc="landscape", enable=progress) as bar, \
            torch.no_grad():
        for batch in batches:
            batch_dev = to_device(batch, centre[0].device)
            count += batch_size(batch)
            for start in range(0, n_points, chunk):
                c = coords_t[start:start + chunk].to(centre[0].device)
                leaves = [t + torch.tensordot(c.to(t.dtype), s, dims=1) for t, s in zip(centre, stacked)]
                total[start:start + len(c)] += batch_size(batch) * _losses(loss, leaves, batch_dev).double().cpu()
                bar.update(len(c))
    if count == 0:
        raise empty_data_error()
    return (total / count).numpy()


def _losses(loss: BorrowedLoss, leaves: list[torch.Tensor], batch: Any) -> torch.Tensor:
    """Loss at each stacked point: vmapped when the model allows it, one point at a time otherwise."""
    try:
        return torch.func.vmap(lambda *ls: loss.evaluate(ls, batch).reshape(()))(*leaves)
    except (RuntimeError, ValueError, NotImplementedError):
        return torch.stack([loss.evaluate([t[i] for t in leaves], batch).reshape(()) for i in range(len(leaves[0]))])


def _grid(span: tuple[float, float], steps: int) -> np.ndarray:
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    lo, hi = span
    if not lo < hi:
        raise ValueError(f"span must be (low, high) with low < high, got {span!r}")
    return np.linspace(lo, hi, steps)


def landscape_1d(model: nn.Module, loss_fn: Any, data: Any, d: Direction, span: tuple[float, float] = (-1, 1),
                 steps: int = 51, **kwargs: Any) -> Landscape:
    r"""L(theta + x d) for ``steps`` values of x in ``span``.

    With :func:`direction_to`, x = 0..1 interpolates between two sets of weights.

    >>> from curvkit.analysis import random_direction
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> line = landscape_1d(model, F.cross_entropy, (x, y), random_direction(model), steps=11)
    >>> bool(abs(line.loss[5] - float(F.cross_entropy(model(x), y))) < 1e-6)     # x = 0: the trained weights
    True
    """
    x = _grid(span, steps)
    return Landscape(x, evaluate_grid(model, loss_fn, data, [d], x[:, None], **kwargs))


def landscape_2d(model: nn.Module, loss_fn: Any, data: Any, d1: Direction, d2: Direction,
                 span: tuple[float, float] = (-1, 1), steps: int = 21, **kwargs: Any) -> Landscape:
    r"""L(theta + x[i] d1 + y[j] d2) on a ``steps`` x ``steps`` grid over ``span`` in both coordinates.

    >>> from curvkit.analysis import eigen_direction
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> d1, d2 = eigen_direction(model, F.cross_entropy, (x, y), k=2)
    >>> land = landscape_2d(model, F.cross_entropy, (x, y), d1, d2, span=(-0.5, 0.5), steps=7)
    >>> fig = land.plot(kind="contour", log=True)
    """
    x = _grid(span, steps)
    X, Y = np.meshgrid(x, x, indexing="ij")
    values = evaluate_grid(model, loss_fn, data, [d1, d2], np.stack([X.ravel(), Y.ravel()], 1), **kwargs)
    return Landscape(x, values.reshape(steps, steps), x.copy())
