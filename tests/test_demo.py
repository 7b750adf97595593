"""The README's demo runs end to end and writes a readable figure."""

from __future__ import annotations

import matplotlib.image as mpimg

from curvkit.cli import main


def test_demo_prints_results_and_writes_its_figures(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--seconds", "0.5"])
    printed = capsys.readouterr().out
    assert "top-5 eigenvalues" in printed and "trace:" in printed and "95% CI" in printed
    assert "edge of stability" in printed and str(tmp_path) in printed
    for name in ["eigenvalue_density.png", "landscape_top2_eigendirections.png", "sharpness_vs_2_over_lr.png"]:
        image = mpimg.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas
