"""``curvkit landscape``: the loss around your trained weights along two directions, in 1-D and 2-D.

.. code-block:: bash

    curvkit landscape --model mypkg.models:make_net --weights net.pt --data mypkg.data:val_batches --out report/
    curvkit landscape ... --directions eigen --steps 21 --span 1

Directions are the top-2 Hessian eigenvectors (``eigen``: unit vectors, from
``eigen_direction(model, loss_fn, data, k=2, seed=SEED)``) or two filter-normalised Gaussian directions
(``random``, the default: ``random_direction(model, seed=SEED)`` and ``seed=SEED + 1``, Li et al. 2018),
restricted to ``--params`` when given. The grid spans ``[-SPAN, SPAN]`` in both coordinates; the model
is never moved (every point is evaluated on copies of the weights).

Writes ``landscape_1d.png`` / ``.csv`` (each direction on its own, 4x finer), ``landscape_2d.png``
(contours, log scale for a positive loss) / ``.csv`` (x, y, loss) and the ``landscape`` entry of
``summary.json`` (the loss at the weights, its range on the grid, the curvature u^T H u / u^T u along each
direction, ``seconds``).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ._loading import CommandError, Inputs, add_arguments, describe, load
from ._report import Report

if TYPE_CHECKING:
    import torch

HELP = "the loss around your trained weights along two directions (random or top Hessian eigenvectors), 1-D and 2-D"


def register(parser: argparse.ArgumentParser) -> None:
    """Add the landscape command's options to its subcommand parser.

    Args:
        parser: the ``curvkit landscape`` subparser.
    """
    add_arguments(parser)
    group = parser.add_argument_group("landscape")
    group.add_argument("--directions", choices=("random", "eigen"), default="random",
                       help="filter-normalised random directions (default) or the top-2 Hessian eigenvectors")
    group.add_argument("--steps", type=int, default=21, help="grid points per coordinate of the 2-D grid (default 21)")
    group.add_argument("--span", type=float, default=1.0, help="the grid covers [-SPAN, SPAN] (default 1)")


def _directions(args: argparse.Namespace, inputs: Inputs) -> list[dict[str, torch.Tensor]]:
    import torch

    from ..analysis import eigen_direction, random_direction

    if args.directions == "eigen":
        return eigen_direction(inputs.model, inputs.loss_fn, inputs.data, k=2, seed=args.seed,
                               **inputs.operator_kwargs)
    directions = [random_direction(inputs.model, seed=args.seed + i) for i in range(2)]
    if inputs.params is None:
        return directions
    return [{n: t if n in inputs.params else torch.zeros_like(t) for n, t in d.items()} for d in directions]


def _curvatures(inputs: Inputs, directions: list[dict[str, torch.Tensor]]) -> list[float | None]:
    """u^T H u / u^T u for each direction u over the analysed parameters (None for a zero direction)."""
    import torch

    from ..hessian import HessianOperator

    H = HessianOperator(inputs.model, inputs.loss_fn, inputs.data, **inputs.operator_kwargs)
    out = []
    for d in directions:
        u = torch.cat([d[n].reshape(-1) for n in H.param_names]).to(H.dtype)
        norm = float(u.double() @ u.double())
        out.append(float(u.double() @ (H @ u).double()) / norm if norm > 0 else None)
    return out


def main(args: argparse.Namespace) -> int:
    """Run the landscape command with the parsed options.

    Args:
        args: the options of :func:`register` and the shared ones of ``add_arguments``.

    Returns:
        0 (failures raise).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from ..analysis import landscape_1d, landscape_2d

    if args.steps < 2 or not args.span > 0:
        raise CommandError(f"--steps must be at least 2 and --span positive, got {args.steps} and {args.span}")
    report = Report(args.out, "landscape")
    inputs = load(args)
    start = time.perf_counter()
    directions = _directions(args, inputs)
    curvature = _curvatures(inputs, directions)
    span = (-args.span, args.span)
    grid_kwargs = {"bn_mode": inputs.bn_mode}
    lines = [landscape_1d(inputs.model, inputs.loss_fn, inputs.data, d, span=span, steps=4 * (args.steps - 1) + 1,
                          **grid_kwargs) for d in directions]
    surface = landscape_2d(inputs.model, inputs.loss_fn, inputs.data, *directions, span=span, steps=args.steps,
                           **grid_kwargs)
    seconds = time.perf_counter() - start

    kinds = (["top Hessian eigenvector", "2nd Hessian eigenvector"] if args.directions == "eigen"
             else [f"random direction {i} (filter-normalised)" for i in (1, 2)])
    names = [kind + ("" if c is None else f", curvature {c:.3g}") for kind, c in zip(kinds, curvature)]
    centre = float(lines[0].loss[len(lines[0].x) // 2])  # x = 0: an odd number of points over [-span, span]
    fig, ax = plt.subplots(figsize=(6, 4))
    for line, name in zip(lines, names):
        ax.plot(line.x, line.loss, label=name)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="step along the direction", ylabel=f"{args.loss} loss",
           title=f"Loss along two directions through the weights ({inputs.n_samples} samples)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    report.figure(fig, "landscape_1d.png")
    report.table(pd.DataFrame({"x": lines[0].x, "loss_direction_1": lines[0].loss,
                               "loss_direction_2": lines[1].loss}), "landscape_1d.csv")

    fig = surface.plot(kind="contour", log=bool((surface.loss > 0).all()))
    fig.axes[0].set(xlabel=names[0], ylabel=names[1], title=f"{args.loss} loss around the weights")
    report.figure(fig, "landscape_2d.png")
    X, Y = np.meshgrid(surface.x, surface.y, indexing="ij")
    report.table(pd.DataFrame({"x": X.ravel(), "y": Y.ravel(), "loss": surface.loss.ravel()}), "landscape_2d.csv")
    report.summary({
        "directions": args.directions, "span": args.span, "steps": args.steps, "loss_at_weights": centre,
        "loss_min": float(surface.loss.min()), "loss_max": float(surface.loss.max()), "curvature": curvature,
        "seconds": round(seconds, 3), "run": describe(args, inputs),
    })
    print(f"loss at the weights {centre:.6g}; on the {args.steps}x{args.steps} grid over "
          f"[-{args.span}, {args.span}]^2: {surface.loss.min():.6g} .. {surface.loss.max():.6g}; "
          f"curvature along the directions: {', '.join('n/a' if c is None else f'{c:.4g}' for c in curvature)}")
    print(report.announce())
    return 0
