"""The demo: train a small MLP on digits, then look at its Hessian with the engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the engine is imported when the demo runs, so that `curvkit --help` stays quick
    from ..analysis import SharpnessTracker

HELP = "train a small MLP on digits and analyse its Hessian"


def register(parser) -> None:
    """Add the demo's options to its subcommand parser."""
    parser.add_argument("--out", default="curvkit-demo", help="folder for the figures (default: curvkit-demo)")
    parser.add_argument("--seconds", type=float, default=3.0, help="training time budget in seconds")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    """Run the demo with the parsed options."""
    run(args.out, seconds=args.seconds, seed=args.seed)
    return 0


def train_mlp(train, seconds: float = 3.0, seed: int = 0) -> nn.Module:
    """A 64-32-10 tanh MLP trained with Adam for about ``seconds`` (at most 60 epochs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    X, y = train
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(60):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        if time.perf_counter() - start > seconds:
            break
    return model.eval()


def run(out: str | Path = "curvkit-demo", seconds: float = 3.0, seed: int = 0) -> dict[str, Path]:
    """Train, analyse, and write three figures into ``out``.

    The figures: eigenvalue density, the 2-D landscape along the top-2 eigenvectors, and sharpness
    against 2/lr under full-batch GD.

    Returns:
        The paths written, by figure.
    """
    import matplotlib

    from ..analysis import eigen_direction, landscape_2d
    from ..datasets import load_digits_tensors
    from ..hessian import HessianOperator, density, eigenvalues, trace

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_tensors(seed)
    model = train_mlp(train, seconds, seed)
    with torch.no_grad():
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    print(f"trained a 64-32-10 MLP on digits: test accuracy {acc:.1%}")

    batch = (train[0][:512], train[1][:512])
    H = HessianOperator(model, F.cross_entropy, batch)
    print(f"Hessian of the loss on {len(batch[1])} training samples: n = {H.shape[0]} parameters")

    top = eigenvalues(H, k=5, seed=seed)
    print(f"top-5 eigenvalues: {', '.join(f'{v:.4f}' for v in top.values.tolist())} "
          f"({top.matvecs} products, max residual {top.residuals.max():.1e}, converged={top.converged})")
    tr = trace(H, rtol=0.02, seed=seed)
    print(f"trace: {tr.estimate:.3f} +- {tr.stderr:.3f} (95% CI {tr.ci95[0]:.3f} .. {tr.ci95[1]:.3f}; "
          f"{tr.method}, {tr.matvecs} products)")

    spec = density(H, n_probes=10, n_iter=80, seed=seed)
    fig = spec.plot()
    fig.axes[0].set_title(f"Eigenvalue density of the digits MLP Hessian (n={H.shape[0]}, SLQ, 10 probes, "
                          f"kernel width {spec.default_sigma():.2g})")
    paths = {"esd": out / "eigenvalue_density.png", "landscape": out / "landscape_top2_eigendirections.png",
             "sharpness": out / "sharpness_vs_2_over_lr.png"}
    fig.savefig(paths["esd"], dpi=120, bbox_inches="tight")

    d1, d2 = eigen_direction(model, F.cross_entropy, batch, k=2, seed=seed)
    land = landscape_2d(model, F.cross_entropy, batch, d1, d2, span=(-2, 2), steps=21)
    fig = land.plot(kind="contour", log=True)
    fig.axes[0].set(xlabel=f"top eigenvector (lambda={top.values[0]:.3f})",
                    ylabel=f"2nd eigenvector (lambda={top.values[1]:.3f})",
                    title="Loss around the trained weights along the top-2 Hessian eigenvectors")
    fig.savefig(paths["landscape"], dpi=120, bbox_inches="tight")

    tracker = edge_of_stability(train, seed=seed)
    tracker.plot().savefig(paths["sharpness"], dpi=120, bbox_inches="tight")
    history = tracker.history
    late = history[history["step"] >= 500]["sharpness"]
    print(f"full-batch GD (lr=2): sharpness rose from {history['sharpness'].iloc[0]:.2f} and hovered at "
          f"{late.min():.2f}..{late.max():.2f} around 2/lr = 1.00 (edge of stability)")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def edge_of_stability(train, lr: float = 2.0, steps: int = 1000, seed: int = 0) -> SharpnessTracker:
    """Full-batch GD with MSE on 500 digits: sharpness rises to 2/lr and hovers there (Cohen et al. 2021)."""
    from ..analysis import SharpnessTracker

    X, y = train[0][:500], F.one_hot(train[1][:500], 10).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).float()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = SharpnessTracker(model, F.mse_loss, (X, y), optimizer=opt, every=25, seed=seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(X), y).backward()
        opt.step()
        tracker.step()
    return tracker
