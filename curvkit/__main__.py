"""Command line: ``python -m curvkit demo [--out DIR] [--seconds S] [--seed N]``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m curvkit", description="curvkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on digits and analyse its Hessian")
    demo.add_argument("--out", default="curvkit-demo", help="folder for the figures (default: curvkit-demo)")
    demo.add_argument("--seconds", type=float, default=3.0, help="training time budget in seconds")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        run(args.out, seconds=args.seconds, seed=args.seed)


if __name__ == "__main__":
    main()
