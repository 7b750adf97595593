"""``curvkit kernels build [--verbose]``: build the kernels ahead of time; ``info``: where and whether."""

from __future__ import annotations

import time

from ..kernels import build

HELP = "build curvkit's compiled kernels ahead of time (build), or say where and whether they are built (info)"


def register(parser) -> None:
    """Add the kernels command's options to its subcommand parser."""
    parser.add_argument("action", choices=("build", "info"))
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")


def main(args) -> int:
    """Build or describe each kernel library; 0 when the CPU library is usable (or off), else 1."""
    ok = True
    for kind in build.LIBRARIES:
        start = time.perf_counter()
        loaded = build.load(kind, verbose=args.verbose) if args.action == "build" else None
        library = build.build_dir(kind) / f"curvkit_kernels_{kind}.so"
        status = ("off (CURVKIT_KERNELS=0)" if build.disabled()
                  else ("built" if library.exists() else "not built") if loaded is None
                  else f"ready in {time.perf_counter() - start:.1f} s" if loaded
                  else f"unavailable: {build.error(kind) or 'no CUDA device'}")
        print(f"{kind:4s}  {build.build_dir(kind)}  {status}")
        ok &= kind == "cuda" or loaded is not False
    return 0 if ok else 1
