"""Progress bars for long runs: on in a terminal, off otherwise or when asked."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, enable: bool | None = None) -> tqdm:
    """A tqdm bar; ``enable=None`` shows it only when stderr is a terminal."""
    show = sys.stderr.isatty() if enable is None else bool(enable)
    return tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
