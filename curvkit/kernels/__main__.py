"""``python -m curvkit.kernels build|info``: an alias of ``curvkit kernels build|info``."""

import sys

from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main(["kernels", *sys.argv[1:]]))
