"""The output folder of the analysis commands: PNG figures, CSV tables and ``summary.json``.

Every command's files have their own names, so several commands can share one ``--out`` folder;
``summary.json`` holds one entry per command that wrote there (``{"spectrum": {...}, "layers": {...}}``),
and running a command again replaces its entry.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class Report:
    """Writes a command's files into ``out``.

    The folder is created, and a ``summary.json`` in it checked, on construction, so that a bad ``--out``
    fails before any work.

    Args:
        out: the output folder.
        command: the command whose entry of ``summary.json`` this report writes.

    Raises:
        CommandError: ``out/summary.json`` exists but was not written by curvkit.
    """

    def __init__(self, out: str | Path, command: str):
        import matplotlib

        matplotlib.use("Agg")  # figures are files: no display needed
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.files: list[str] = []
        self._summaries()

    def _summaries(self) -> dict[str, Any]:
        """The entries already in ``summary.json`` (none if there is no such file)."""
        from . import COMMANDS
        from ._loading import CommandError

        path = self.out / "summary.json"
        if not path.exists():
            return {}
        try:
            entries = json.loads(path.read_text())
        except ValueError:
            entries = None
        if not (isinstance(entries, dict) and set(entries) <= set(COMMANDS)):
            raise CommandError(f"{path} exists and was not written by curvkit; choose another --out or move it")
        return entries

    def _path(self, name: str) -> Path:
        self.files.append(name)
        return self.out / name

    def figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib Figure as ``name`` (PNG) and close it.

        Args:
            fig: the figure.
            name: its file name in the folder.
        """
        import matplotlib.pyplot as plt

        fig.savefig(self._path(name), dpi=120, bbox_inches="tight")
        plt.close(fig)

    def table(self, df: pd.DataFrame, name: str) -> None:
        """Save a DataFrame as ``name`` (CSV, no index).

        Args:
            df: the table.
            name: its file name in the folder.
        """
        df.to_csv(self._path(name), index=False)

    def summary(self, results: dict[str, Any]) -> Path:
        """Write this command's entry of ``summary.json``: ``results`` plus the files it wrote.

        The file is replaced in one step (written beside it, then renamed), keeping the other commands' entries.

        Args:
            results: this command's results (numbers, lists, dicts; numpy/torch values are converted).

        Returns:
            The path of ``summary.json``.
        """
        path = self._path("summary.json")
        entries = {**self._summaries(), self.command: {**results, "files": self.files}}
        staging = path.with_name(f".summary.json.{os.getpid()}")
        staging.write_text(json.dumps(_plain(entries), indent=2, allow_nan=False) + "\n")
        os.replace(staging, path)
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
