"""The ``curvkit`` command line (also ``python -m curvkit``): one module per subcommand.

Each subcommand module has ``HELP`` (one line), ``register(parser)`` (its options) and
``main(args) -> int`` (its exit status); :data:`COMMANDS` lists them in the order ``--help`` shows.

.. code-block:: bash

    curvkit demo --out curvkit-demo
    curvkit kernels build
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

COMMANDS = ("demo", "kernels")


def parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command (modules imported lazily on use)."""
    root = argparse.ArgumentParser(prog="curvkit", description="curvkit: curvature for PyTorch models")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(command)
        command.set_defaults(run=module.main)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments) and run the chosen command.

    Returns:
        The command's exit status.
    """
    args = parser().parse_args(argv)
    return int(args.run(args) or 0)
