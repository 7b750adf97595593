"""``curvkit layers``: the trace and top eigenvalue of every layer's diagonal Hessian block.

.. code-block:: bash

    curvkit layers --model mypkg.models:make_net --weights net.pt --data mypkg.data:val_batches --out report/

The table is ``layerwise(model, loss_fn, data, stats=("trace", "top_eig"), by=BY, seed=SEED, rtol=RTOL)``:
one row per module that owns parameters (or per parameter with ``--by parameter``), with the block
trace (Hutchinson on shared probes until every block's relative standard error reaches ``--rtol``),
its standard error, the block's top eigenvalue (lock-step Lanczos) and the mean eigenvalue
trace / n_params.

Writes ``layers.csv``, ``layers.png`` (trace with error bars and top eigenvalue per layer) and the
``layers`` entry of ``summary.json``.
"""

from __future__ import annotations

import argparse
import time

from ._loading import add_arguments, describe, load
from ._report import Report

HELP = "per-layer Hessian trace (with error bars) and top eigenvalue of your model"


def register(parser: argparse.ArgumentParser) -> None:
    """Add the layers command's options to its subcommand parser.

    Args:
        parser: the ``curvkit layers`` subparser.
    """
    add_arguments(parser)
    group = parser.add_argument_group("layers")
    group.add_argument("--by", choices=("module", "parameter"), default="module",
                       help="one row per module that owns parameters (default) or per parameter")
    group.add_argument("--rtol", type=float, default=0.05,
                       help="relative standard error every block trace must reach (default 0.05)")
    group.add_argument("--max-matvecs", type=int, metavar="N",
                       help="the most Hessian-vector products for the traces (default 500)")
    group.add_argument("--eig-tol", type=float, default=1e-3,
                       help="relative error bound of the block top eigenvalues (default 1e-3)")


def _plot(df, label: str, loss: str):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(df) + 1.8), sharey=True)
    y = np.arange(len(df))
    axes[0].barh(y, df["trace"], xerr=df["trace_stderr"], color="tab:blue", alpha=0.8,
                 error_kw={"lw": 1, "capsize": 2})
    axes[0].set(xlabel="trace of the block  (bars: +-1 standard error)", ylabel=label)
    axes[1].barh(y, df["top_eig"], color="tab:red", alpha=0.8)
    axes[1].set(xlabel="top eigenvalue of the block")
    axes[0].set_yticks(y, df[label])
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Diagonal Hessian blocks of the {loss} loss, by {label}")
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> int:
    """Run the layers command with the parsed options.

    Args:
        args: the options of :func:`register` and the shared ones of ``add_arguments``.

    Returns:
        0 (failures raise).
    """
    from ..hessian import layerwise

    report = Report(args.out, "layers")
    inputs = load(args)
    start = time.perf_counter()
    df = layerwise(inputs.model, inputs.loss_fn, inputs.data, stats=("trace", "top_eig"), by=args.by,
                   seed=args.seed, rtol=args.rtol, max_matvecs=args.max_matvecs,
                   eig_tol=args.eig_tol, **inputs.operator_kwargs)
    seconds = time.perf_counter() - start
    df["mean_eig"] = df["trace"] / df["n_params"]
    label = args.by
    report.table(df, "layers.csv")
    report.figure(_plot(df, label, args.loss), "layers.png")
    report.summary({"by": args.by, "rows": df.to_dict(orient="records"), "n_params": int(df["n_params"].sum()),
                    "matvecs": df.attrs["matvecs"], "seconds": round(seconds, 3), "run": describe(args, inputs)})
    width = max(len(str(name)) for name in df[label])
    for row in df.itertuples():
        print(f"{getattr(row, label):{width}s}  n={row.n_params:<8d} trace {row.trace:.4g} +- {row.trace_stderr:.2g}  "
              f"top eigenvalue {row.top_eig:.4g}")
    print(report.announce())
    return 0
