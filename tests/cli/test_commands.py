"""The four analysis commands end to end: what they write equals the Python API and the dense Hessian."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from curvkit.analysis import random_direction
from curvkit.compress import mixed_precision, sensitivity
from curvkit.hessian import HessianOperator, density, eigenvalues, trace

BLOCKS = {"0": slice(0, 30), "2": slice(30, 51)}            # modules: weight and bias
WEIGHTS = {"0": slice(0, 24), "2": slice(30, 48)}           # the weight blocks only


def _png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{path.name} is not a real figure"


def _summary(out, command: str) -> dict:
    return json.loads((out / "summary.json").read_text())[command]


def test_spectrum_reports_the_api_numbers_and_the_exact_spectrum(project, dense, tmp_path):
    out = tmp_path / "report"
    result = project.analyse("spectrum", str(out), "--probes", "3", "--iters", "20")
    s = _summary(out, "spectrum")
    assert set(s) >= {"top_eigenvalues", "residuals", "converged", "trace", "n_params", "matvecs", "seconds"}
    assert set(s["trace"]) >= {"estimate", "stderr", "ci95"} and s["n_params"] == 51 and s["seconds"] > 0

    H = HessianOperator(project.model(), F.cross_entropy, project.data.batches())
    top = eigenvalues(H, k=5, seed=0)
    tr = trace(H, rtol=0.02, seed=0)
    density(H, n_probes=3, n_iter=20, seed=0)
    np.testing.assert_allclose(s["top_eigenvalues"], top.values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s["residuals"], top.residuals.numpy(), rtol=1e-3, atol=1e-9)
    assert s["converged"] == top.converged and s["matvecs"] == H.matvecs
    assert s["trace"]["estimate"] == pytest.approx(tr.estimate, rel=1e-6) and s["trace"]["method"] == tr.method

    exact = torch.linalg.eigvalsh(dense).flip(0)
    np.testing.assert_allclose(s["top_eigenvalues"], exact[:5].numpy(), rtol=1e-4)
    assert abs(s["trace"]["estimate"] - float(exact.sum())) <= 4 * s["trace"]["stderr"] + 1e-4 * float(exact.sum())
    assert s["trace"]["ci95"][0] <= s["trace"]["estimate"] <= s["trace"]["ci95"][1]
    assert s["run"]["n_samples"] == 96 and s["run"]["n_batches"] == 3 and s["run"]["seed"] == 0
    _png(out / "density.png")
    assert pd.read_csv(out / "eigenvalues.csv")["eigenvalue"].tolist() == pytest.approx(s["top_eigenvalues"])
    assert "top-5 eigenvalues" in result.stdout and "summary.json" in result.stdout


def test_landscape_along_eigenvectors_starts_at_the_loss_and_curves_by_the_eigenvalues(project, dense, tmp_path):
    out = tmp_path / "report"
    project.analyse("landscape", str(out), "--directions", "eigen", "--steps", "5", "--span", "2")
    s = _summary(out, "landscape")
    x, y = project.data.one_batch()
    with torch.no_grad():
        loss = float(F.cross_entropy(project.model()(x), y))
    assert s["loss_at_weights"] == pytest.approx(loss, rel=1e-6)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    np.testing.assert_allclose(s["curvature"], exact[:2].numpy(), rtol=1e-4)
    grid = pd.read_csv(out / "landscape_2d.csv")
    assert len(grid) == 25 and set(grid["x"]) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert grid.query("x == 0 and y == 0")["loss"].item() == pytest.approx(loss, rel=1e-6)
    assert s["loss_min"] <= loss <= s["loss_max"]
    line = pd.read_csv(out / "landscape_1d.csv")
    assert len(line) == 17 and line["loss_direction_1"].iloc[8] == pytest.approx(loss, rel=1e-6)
    # a quadratic along a unit eigenvector: L(t) - L(0) ~ lambda t^2 / 2 for small t (t = 0.25 here)
    rise = line["loss_direction_1"].iloc[9] - loss
    assert rise == pytest.approx(exact[0].item() * 0.25**2 / 2, rel=0.1)
    _png(out / "landscape_1d.png")
    _png(out / "landscape_2d.png")


def test_landscape_with_params_moves_only_the_selected_block(project, dense, tmp_path):
    out = tmp_path / "report"
    project.analyse("landscape", str(out), "--steps", "3", "--params", "2.*", "--seed", "7")
    s = _summary(out, "landscape")
    model = project.model()
    for seed, curvature in zip((7, 8), s["curvature"]):
        d = random_direction(model, seed=seed)
        u = torch.cat([d["2.weight"].reshape(-1), d["2.bias"]]).double()   # the selected block, 48..51 zero
        block = dense[30:51, 30:51]
        assert curvature == pytest.approx(float(u @ block @ u / (u @ u)), rel=1e-4)
    assert s["run"]["params"] == ["2.weight", "2.bias"] and s["run"]["seed"] == 7


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_sensitivity_table_matches_the_api_and_the_exact_traces(project, dense, tmp_path, granularity):
    out = tmp_path / "report"
    extra = ("--bits", "2,4,8", "--avg-bits", "4", "--frontier", "5") if granularity == "layer" else ()
    project.analyse("sensitivity", str(out), "--granularity", granularity, *extra)
    table = pd.read_csv(out / "sensitivity.csv", dtype={"module": str})
    model = project.model()
    api = sensitivity(model, F.cross_entropy, project.data.batches(), granularity=granularity, seed=0)
    np.testing.assert_allclose(table["trace"], api["trace"], rtol=1e-6)
    _png(out / "sensitivity.png")
    s = _summary(out, "sensitivity")
    if granularity == "layer":
        for row in table.itertuples():
            exact = float(dense[WEIGHTS[row.module], WEIGHTS[row.module]].diagonal().sum())
            assert abs(row.trace - exact) <= 4 * row.trace_stderr, (row.module, row.trace, exact)
        res = mixed_precision(model, api, bits=(2, 4, 8), max_weight_bits=4 * api["n_params"].sum())
        assert s["mixed_precision"]["bits"] == res.bits and s["mixed_precision"]["avg_bits"] <= 4
        assert pd.read_csv(out / "mixed_precision.csv")["bits"].tolist() == list(res.bits.values())
        assert len(pd.read_csv(out / "frontier.csv")) >= 2
        _png(out / "mixed_precision_frontier.png")
    else:
        assert len(table) == 9 and "mixed_precision" not in s
        assert (table["hap"] == table["trace"] / table["n_params"] * table["weight_sq"]).all()


def test_layers_traces_and_top_eigenvalues_match_the_dense_blocks(project, dense, tmp_path):
    out = tmp_path / "report"
    result = project.analyse("layers", str(out))
    table = pd.read_csv(out / "layers.csv", dtype={"module": str})
    assert table["module"].tolist() == ["0", "2"] and table["n_params"].tolist() == [30, 21]
    for row in table.itertuples():
        block = dense[BLOCKS[row.module], BLOCKS[row.module]]
        assert abs(row.trace - float(block.diagonal().sum())) <= 4 * row.trace_stderr
        assert row.top_eig == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-2)
    s = _summary(out, "layers")
    assert [r["module"] for r in s["rows"]] == ["0", "2"] and s["matvecs"] > 0
    _png(out / "layers.png")
    assert "top eigenvalue" in result.stdout
