"""Every notebook in notebooks/ runs end to end in a fresh Jupyter kernel (nbclient) and is stored without outputs.

New notebooks are picked up by the glob. The kernel imports the curvkit under test (this checkout first
on its path), runs with one thread (the examples are tiny; threads only contend on a shared machine)
and without the compiled kernels (their results equal the PyTorch path, and tests/kernels builds them).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import curvkit

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_and_shows_its_figures(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": str(Path(curvkit.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "CURVKIT_KERNELS": "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # CI exports Agg
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no figure"
    assert not [o for o in outputs if o.get("name") == "stderr" and "Traceback" in o.get("text", "")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert _code_cells(nb), f"{path.name} has no code"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (f"{path.name}: cells {dirty} are stored with outputs; clear them "
                       f"(jupyter nbconvert --clear-output --inplace {path.name})")


def test_there_are_notebooks():
    assert {"adahessian_swap_in", "landscape_and_spectrum", "sensitivity_for_compression",
            "cram_train_once_prune_later", "adversarial_examples_from_curvature",
            "newton_cg_and_local_newton"} <= set(IDS)
