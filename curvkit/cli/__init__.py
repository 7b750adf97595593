"""The ``curvkit`` command line (also ``python -m curvkit``): one module per subcommand.

Each subcommand module has ``HELP`` (one line), ``register(parser)`` (its options) and
``main(args) -> int`` (its exit status); :data:`COMMANDS` lists them in the order ``--help`` shows.
A failure prints one line, ``curvkit COMMAND: error: ...``, and exits with status 1 (``--debug`` shows
the traceback instead); warnings print as ``curvkit COMMAND: warning: ...``.

.. code-block:: bash

    curvkit spectrum --model mypkg.models:make_net --weights net.pt --data mypkg.data:val_batches --out report/
    curvkit landscape ... --directions eigen
    curvkit sensitivity ... --bits 2,4,8 --avg-bits 4
    curvkit layers ...
    curvkit demo --out curvkit-demo
    curvkit kernels build
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

COMMANDS = ("spectrum", "landscape", "sensitivity", "layers", "demo", "kernels")


def parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command.

    Returns:
        The root parser.
    """
    root = argparse.ArgumentParser(prog="curvkit", description="curvkit: curvature for PyTorch models")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.register(command)
        command.add_argument("--debug", action="store_true", help="on a failure, show the full traceback")
        command.set_defaults(run=module.main)
    return root


def _error_line(exc: BaseException) -> str:
    from ._loading import CommandError

    message = " ".join(str(exc).split())
    return message if isinstance(exc, CommandError) else f"{type(exc).__name__}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments) and run the chosen command.

    Args:
        argv: the arguments after ``curvkit`` (None: ``sys.argv[1:]``).

    Returns:
        The command's exit status: 0 on success, 1 on a failure (reported in one line on stderr),
        130 when interrupted; argparse exits with 2 on a usage error.
    """
    args = parser().parse_args(argv)
    prefix = f"curvkit {args.command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prefix}: error: {_error_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 1
