"""``curvkit sensitivity``: Hessian sensitivity of every Linear/Conv layer or channel, and HAWQ mixed precision.

.. code-block:: bash

    curvkit sensitivity --model mypkg.models:make_net --weights net.pt --data mypkg.data:val_batches --out report/
    curvkit sensitivity ... --granularity layer --bits 2,4,8 --avg-bits 4
    curvkit sensitivity ... --granularity channel

The table is ``sensitivity(model, loss_fn, data, granularity, rtol=RTOL, seed=SEED)``: per layer the
weight block's ``trace`` (with ``trace_stderr``), ``mean_eig`` = trace / n_params, ``weight_sq`` and
``macs``; per channel ``trace``, ``weight_sq`` and HAP's score ``hap``. ``--params`` keeps the layers
whose weight it selects. At layer granularity the exact HAWQ-v3 assignment for an average of
``--avg-bits`` bits per weight (default: the middle of ``--bits``) and the Pareto frontier over all
budgets are solved too (``mixed_precision(model, sens, bits, max_weight_bits=AVG_BITS * n, frontier=N)``).

Writes ``sensitivity.csv``, ``sensitivity.png`` (bars with error bars), and for layers
``mixed_precision.csv`` (bits per layer), ``frontier.csv`` and ``mixed_precision_frontier.png``, and the
``sensitivity`` entry of ``summary.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ._loading import CommandError, Inputs, add_arguments, describe, load, positive_int
from ._report import Report

if TYPE_CHECKING:
    import pandas as pd

HELP = "Hessian sensitivity of every Linear/Conv layer or channel, and the HAWQ mixed-precision frontier"
TOP_CHANNELS = 30


def _bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bit widths separated by commas, e.g. 2,4,8; got {text!r}") from None
    if not bits or bits[0] < 1:
        raise argparse.ArgumentTypeError(f"bit widths must be positive integers, got {text!r}")
    return bits


def register(parser: argparse.ArgumentParser) -> None:
    """Add the sensitivity command's options to its subcommand parser.

    Args:
        parser: the ``curvkit sensitivity`` subparser.
    """
    add_arguments(parser)
    group = parser.add_argument_group("sensitivity")
    group.add_argument("--granularity", choices=("layer", "channel"), default="layer",
                       help="one row per Linear/Conv layer (default) or per output channel")
    group.add_argument("--rtol", type=float, default=0.05,
                       help="relative standard error every trace must reach (default 0.05)")
    group.add_argument("--max-matvecs", type=int, metavar="N",
                       help="the most Hessian-vector products for the traces (default 500 per layer run, 1000 per "
                            "channel run)")
    group.add_argument("--bits", type=_bits, default=(2, 4, 8), metavar="B,B,...",
                       help="candidate bit widths for mixed precision (default 2,4,8)")
    group.add_argument("--avg-bits", type=float, metavar="B",
                       help="average bits per weight of the mixed-precision budget (default: the middle of --bits)")
    group.add_argument("--frontier", type=positive_int, default=9, metavar="N",
                       help="budgets solved for the Pareto frontier (default 9)")


def _freeze_unselected(inputs: Inputs) -> None:
    """Keep only the layers whose weight ``--params`` selects (this model instance is the command's own)."""
    if inputs.params is None:
        return
    for name, p in inputs.model.named_parameters():
        if name not in inputs.params:
            p.requires_grad_(False)


def _spans_decades(values: pd.Series) -> bool:
    """Whether positive values spread over more than two orders of magnitude (then a log axis reads better)."""
    return bool((values > 0).all() and values.max() > 100 * values.min())


def _plot_layers(sens: pd.DataFrame, loss: str):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(sens) + 1.5))
    y = np.arange(len(sens))
    ax.barh(y, sens["mean_eig"], xerr=sens["trace_stderr"] / sens["n_params"], color="tab:blue", alpha=0.8,
            error_kw={"lw": 1, "capsize": 2})
    ax.set_yticks(y, sens["module"])
    ax.invert_yaxis()
    if _spans_decades(sens["mean_eig"]):
        ax.set_xscale("log")
    ax.set(ylabel="layer", xlabel="mean Hessian eigenvalue tr(H_ii) / n_i  (bars: +-1 standard error)",
           title=f"Layer sensitivity of the {loss} loss (HAWQ-v2)")
    ax.grid(alpha=0.3, axis="x")
    return fig


def _plot_channels(sens: pd.DataFrame, loss: str):
    import matplotlib.pyplot as plt
    import numpy as np

    top = sens.sort_values("hap", ascending=False).head(TOP_CHANNELS)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1.5))
    y = np.arange(len(top))
    err = top["trace_stderr"] / top["n_params"] * top["weight_sq"]
    ax.barh(y, top["hap"], xerr=err, color="tab:orange", alpha=0.8, error_kw={"lw": 1, "capsize": 2})
    ax.set_yticks(y, [f"{m}[{c}]" for m, c in zip(top["module"], top["channel"])], fontsize=8)
    ax.invert_yaxis()
    if _spans_decades(top["hap"]):
        ax.set_xscale("log")
    ax.set(ylabel="layer[channel]", xlabel="HAP score tr(H_cc) / n_c ||w_c||^2  (bars: +-1 standard error)",
           title=(f"The {len(top)} most sensitive of {len(sens)} channels" if len(top) < len(sens)
                  else f"All {len(sens)} channels by sensitivity") + f" ({loss} loss)")
    ax.grid(alpha=0.3, axis="x")
    return fig


def _avg_bits(args: argparse.Namespace) -> float:
    """The mixed-precision budget in bits per weight: ``--avg-bits``, else the middle of ``--bits``."""
    bits = args.bits
    avg = bits[len(bits) // 2] if args.avg_bits is None else args.avg_bits
    if not bits[0] <= avg:
        raise CommandError(f"--avg-bits {avg:g} is below the smallest of --bits {','.join(map(str, bits))}: "
                           "no assignment fits; raise --avg-bits or add a smaller width")
    return avg


def _mixed_precision(args: argparse.Namespace, inputs: Inputs, sens: pd.DataFrame, report: Report) -> dict:
    from ..compress import mixed_precision

    bits, avg = args.bits, _avg_bits(args)
    n = int(sens["n_params"].sum())
    res = mixed_precision(inputs.model, sens, bits=bits, max_weight_bits=avg * n, frontier=args.frontier)
    report.table(res.table, "mixed_precision.csv")
    frontier = res.frontier.assign(bits=[",".join(str(b[m]) for m in sens["module"]) for b in res.frontier["bits"]])
    report.table(frontier, "frontier.csv")
    fig = res.plot_frontier()
    ax = fig.axes[0]
    ax.plot(res.weight_bits / n, res.objective, "r*", ms=12, label=f"chosen: budget {avg:g} bits/weight")
    ax.legend()
    report.figure(fig, "mixed_precision_frontier.png")
    print(f"mixed precision at {avg:g} bits/weight (exact ILP): "
          f"{', '.join(f'{m}={b}' for m, b in res.bits.items())} -> {res.weight_bits / n:.2f} bits/weight")
    return {"avg_bits_budget": avg, "bits": res.bits, "avg_bits": res.weight_bits / n, "weight_bits": res.weight_bits,
            "objective": res.objective, "bops": res.bops}


def main(args: argparse.Namespace) -> int:
    """Run the sensitivity command with the parsed options.

    Args:
        args: the options of :func:`register` and the shared ones of ``add_arguments``.

    Returns:
        0 (failures raise).
    """
    from ..compress import sensitivity

    if args.granularity == "channel" and args.avg_bits is not None:
        raise CommandError("--avg-bits needs --granularity layer: mixed precision assigns bits per layer")
    if args.granularity == "layer":
        _avg_bits(args)  # a budget no assignment fits fails before the work
    report = Report(args.out, "sensitivity")
    inputs = load(args)
    _freeze_unselected(inputs)
    start = time.perf_counter()
    sens = sensitivity(inputs.model, inputs.loss_fn, inputs.data, granularity=args.granularity, rtol=args.rtol,
                       seed=args.seed, max_matvecs=args.max_matvecs, bn_mode=inputs.bn_mode)
    matvecs = sens.attrs.get("matvecs")
    report.table(sens, "sensitivity.csv")
    plot = _plot_layers if args.granularity == "layer" else _plot_channels
    report.figure(plot(sens, args.loss), "sensitivity.png")
    summary = {"granularity": args.granularity, "rows": len(sens), "n_params": int(sens["n_params"].sum()),
               "matvecs": matvecs, "skipped": sens.attrs.get("skipped", [])}
    if args.granularity == "layer":
        top = sens.sort_values("mean_eig", ascending=False).head(5)
        print("most sensitive layers (mean eigenvalue): " + ", ".join(
            f"{m}: {v:.3g}" for m, v in top[["module", "mean_eig"]].values))
        summary["mixed_precision"] = _mixed_precision(args, inputs, sens, report)
    else:
        top = sens.sort_values("hap", ascending=False).head(5)
        print("most sensitive channels (HAP): " + ", ".join(
            f"{m}[{c}]: {v:.3g}" for m, c, v in top[["module", "channel", "hap"]].values))
    for note in summary["skipped"]:
        print(f"note: {note}")
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["run"] = describe(args, inputs)
    report.summary(summary)
    print(report.announce())
    return 0
