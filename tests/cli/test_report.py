"""The output folder: commands share it, summary.json keeps one entry per command, foreign files are kept."""

from __future__ import annotations

import json

import pytest

from curvkit.cli import main
from curvkit.cli._loading import CommandError
from curvkit.cli._report import Report


def test_commands_share_a_folder_and_summary_json_keeps_an_entry_each(tmp_path):
    first = Report(tmp_path, "spectrum")
    first.summary({"top_eigenvalues": [2.0, 1.0], "trace": {"ci95": (0.5, float("inf"))}})
    second = Report(tmp_path, "layers")
    second.summary({"rows": []})
    Report(tmp_path, "spectrum").summary({"top_eigenvalues": [3.0]})   # a rerun replaces its own entry
    entries = json.loads((tmp_path / "summary.json").read_text())
    assert list(entries) == ["spectrum", "layers"]
    assert entries["spectrum"] == {"top_eigenvalues": [3.0], "files": ["summary.json"]}
    assert entries["layers"]["rows"] == []
    assert not list(tmp_path.glob(".summary.json.*"))


def test_non_finite_numbers_are_written_as_null(tmp_path):
    Report(tmp_path, "spectrum").summary({"trace": {"ci95": (0.5, float("inf")), "stderr": float("nan")}})
    assert json.loads((tmp_path / "summary.json").read_text())["spectrum"]["trace"] == {"ci95": [0.5, None],
                                                                                          "stderr": None}


def test_a_summary_json_that_curvkit_did_not_write_is_left_alone(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(CommandError, match="was not written by curvkit"):
        Report(tmp_path, "spectrum")
    assert main(["layers", "--model", "m:f", "--data", "m:g", "--out", str(tmp_path)]) == 1
    assert "was not written by curvkit; choose another --out" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == '{"accuracy": 0.9}'
