"""``curvkit spectrum``: top Hessian eigenvalues, the trace with its error bar, and the eigenvalue density.

.. code-block:: bash

    curvkit spectrum --model mypkg.models:make_net --weights net.pt --data mypkg.data:val_batches --out report/

The numbers are those of the Python API on the same model, data and seed::

    H = build_operator(OPERATOR, model, loss_fn, data, params=PARAMS, bn_mode=BN_MODE)
    eigenvalues(H, k=TOP, tol=TOL, max_matvecs=MAX_MATVECS, seed=SEED)
    trace(H, rtol=RTOL, max_matvecs=MAX_MATVECS, seed=SEED)
    density(H, n_probes=PROBES, n_iter=ITERS, seed=SEED)

Writes ``density.png`` (the smoothed spectral density, log scale), ``eigenvalues.csv`` (rank, eigenvalue,
residual) and the ``spectrum`` entry of ``summary.json`` (``top_eigenvalues``, ``residuals``, ``converged``,
``trace`` with ``estimate``/``stderr``/``ci95``, ``n_params``, ``matvecs``, ``seconds`` and, under ``run``, what
the run was given).
"""

from __future__ import annotations

import argparse
import time

from ._loading import add_arguments, describe, load
from ._report import Report

NAMES = {"hessian": "Hessian", "ggn": "GGN"}
HELP = "top Hessian eigenvalues, the trace with its error bar, and the eigenvalue density of your model"


def register(parser: argparse.ArgumentParser) -> None:
    """Add the spectrum command's options to its subcommand parser.

    Args:
        parser: the ``curvkit spectrum`` subparser.
    """
    add_arguments(parser)
    group = parser.add_argument_group("spectrum")
    group.add_argument("--top", type=int, default=5, help="how many of the largest eigenvalues (default 5)")
    group.add_argument("--tol", type=float, default=1e-6,
                       help="relative error bound every top eigenvalue must reach (default 1e-6)")
    group.add_argument("--rtol", type=float, default=0.02,
                       help="relative standard error the trace estimate must reach (default 0.02)")
    group.add_argument("--max-matvecs", type=int, metavar="N",
                       help="the most Hessian-vector products for the eigenvalues and for the trace, each "
                            "(defaults: min(n, 100 + 20 TOP) and 1000)")
    group.add_argument("--probes", type=int, default=10, help="random probes of the density (default 10)")
    group.add_argument("--iters", type=int, help="Lanczos steps per density probe (default: min(80, n))")
    group.add_argument("--operator", choices=("hessian", "ggn"), default="hessian",
                       help="the Hessian (default) or the generalised Gauss-Newton matrix")


def main(args: argparse.Namespace) -> int:
    """Run the spectrum command with the parsed options.

    Args:
        args: the options of :func:`register` and the shared ones of ``add_arguments``.

    Returns:
        0 (failures raise).
    """
    import pandas as pd

    from ..hessian import build_operator, density, eigenvalues, trace

    report = Report(args.out, "spectrum")
    inputs = load(args)
    start = time.perf_counter()
    H = build_operator(args.operator, inputs.model, inputs.loss_fn, inputs.data, **inputs.operator_kwargs)
    print(f"{NAMES[args.operator]} of the {args.loss} loss over {inputs.n_samples} samples in "
          f"{inputs.n_batches} batches: {H.shape[0]} parameters")
    top = eigenvalues(H, k=args.top, tol=args.tol, max_matvecs=args.max_matvecs, seed=args.seed)
    tr = trace(H, rtol=args.rtol, max_matvecs=args.max_matvecs, seed=args.seed)
    spectrum = density(H, n_probes=args.probes, n_iter=args.iters, seed=args.seed)
    seconds = time.perf_counter() - start

    print(f"top-{args.top} eigenvalues: {', '.join(f'{v:.6g}' for v in top.values.tolist())} "
          f"(max residual {top.residuals.max():.1e}, converged={top.converged})")
    print(f"trace: {tr.estimate:.6g} +- {tr.stderr:.2g} (95% CI {tr.ci95[0]:.6g} .. {tr.ci95[1]:.6g}, {tr.method})")
    fig = spectrum.plot()
    fig.axes[0].set_title(f"Eigenvalue density of the {NAMES[args.operator]} (n={H.shape[0]}, SLQ, "
                          f"{args.probes} probes, kernel width {spectrum.default_sigma():.2g})", fontsize=10)
    report.figure(fig, "density.png")
    report.table(pd.DataFrame({"rank": range(1, args.top + 1), "eigenvalue": top.values.numpy(),
                               "residual": top.residuals.numpy()}), "eigenvalues.csv")
    report.summary({
        "top_eigenvalues": top.values, "residuals": top.residuals, "converged": top.converged,
        "trace": {"estimate": tr.estimate, "stderr": tr.stderr, "ci95": tr.ci95, "method": tr.method,
                  "converged": tr.converged, "matvecs": tr.matvecs},
        "density": {"probes": spectrum.n_probes, "range": [spectrum.nodes.min(), spectrum.nodes.max()],
                    "kernel_width": spectrum.default_sigma()},
        "operator": args.operator, "n_params": H.shape[0], "matvecs": H.matvecs, "seconds": round(seconds, 3),
        "run": describe(args, inputs),
    })
    print(report.announce())
    return 0
