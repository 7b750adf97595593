"""``python -m curvkit.kernels build [--verbose]``: build the kernels ahead of time; ``info``: where and whether."""

from __future__ import annotations

import argparse
import time

from . import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curvkit.kernels", description=__doc__)
    parser.add_argument("command", choices=("build", "info"))
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    ok = True
    for kind in build.LIBRARIES:
        start = time.perf_counter()
        loaded = build.load(kind, verbose=args.verbose) if args.command == "build" else None
        library = build.build_dir(kind) / f"curvkit_kernels_{kind}.so"
        status = ("off (CURVKIT_KERNELS=0)" if build.disabled()
                  else ("built" if library.exists() else "not built") if loaded is None
                  else f"ready in {time.perf_counter() - start:.1f} s" if loaded
                  else f"unavailable: {build.error(kind) or 'no CUDA device'}")
        print(f"{kind:4s}  {build.build_dir(kind)}  {status}")
        ok &= kind == "cuda" or loaded is not False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
