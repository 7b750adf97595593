"""The output folder of an analysis command: PNG figures, CSV tables and ``summary.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class Report:
    """Writes a command's files into ``out`` (created on construction, so a bad folder fails before any work).

    Args:
        out: the output folder.
    """

    def __init__(self, out: str | Path):
        import matplotlib

        matplotlib.use("Agg")  # figures are files: no display needed
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []

    def _path(self, name: str) -> Path:
        self.files.append(name)
        return self.out / name

    def figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib Figure as ``name`` (PNG) and close it."""
        import matplotlib.pyplot as plt

        fig.savefig(self._path(name), dpi=120, bbox_inches="tight")
        plt.close(fig)

    def table(self, df: pd.DataFrame, name: str) -> None:
        """Save a DataFrame as ``name`` (CSV, no index)."""
        df.to_csv(self._path(name), index=False)

    def summary(self, results: dict[str, Any]) -> Path:
        """Write ``summary.json``: ``results`` plus the list of files written.

        Returns:
            The path of ``summary.json``.
        """
        path = self._path("summary.json")
        text = json.dumps(_plain({**results, "files": self.files}), indent=2, allow_nan=False)
        path.write_text(text + "\n")
        return path

    def announce(self) -> str:
        """The line that says where the files are."""
        return f"wrote {len(self.files)} files to {self.out}/: {', '.join(self.files)}"


def _plain(value: Any) -> Any:
    """``value`` with numpy/torch scalars, arrays and tuples made JSON types; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
