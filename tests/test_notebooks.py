"""Every notebook runs end to end: its code cells are executed in order in a fresh namespace."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells, f"{path.name} has no code"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as in a fresh kernel (the test suite defaults to float64)
    try:
        for i, cell in enumerate(cells):
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)
    finally:
        torch.set_default_dtype(default_dtype)
    assert list(tmp_path.glob("*.png")), "the notebook writes its figures"


def test_notebooks_exist():
    assert NOTEBOOKS
