"""Every way a user's input can be wrong ends in one line that says what to do, exit status 1, no traceback.

The failures the issue names run as a user runs them (subprocesses); the other loading checks call the
same ``main`` in this process, which is the code between the arguments and the exit status.
"""

from __future__ import annotations

import pytest
import torch

from curvkit.cli import main

MODEL = ("--model", "userpkg.models:make_net")
DATA = ("--data", "userpkg.data:batches")


def _one_line(stderr: str, command: str = "spectrum") -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"curvkit {command}: error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(("argv", "expected"), [
    (("--model", "nopkg.models:make_net", *DATA), "there is no module 'nopkg'"),
    (("--model", "userpkg.models:not_a_model", *DATA), "returned a dict, not a torch.nn.Module"),
    (("--model", "userpkg.models:make_wider_net", "--weights", "net.pt", *DATA), "does not fit --model"),
    ((*MODEL, *DATA, "--device", f"cuda:{torch.cuda.device_count()}"), "--device cuda:"),
], ids=["unimportable-module", "factory-returns-no-model", "state-dict-mismatch", "absent-cuda-device"])
def test_user_errors_in_a_subprocess(project, tmp_path, argv, expected):
    result = project.run("spectrum", *argv, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert expected in _one_line(result.stderr)


def test_debug_shows_the_traceback_instead(project, tmp_path):
    result = project.run("spectrum", "--model", "nopkg.models:make_net", *DATA, "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "CommandError" in result.stderr


class _RunsCode:
    """Unpickling this calls open(path, "w"): code that runs on load, harmless but visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_weights_file_that_would_run_code_is_refused_and_nothing_runs(project, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"0.weight": torch.zeros(6, 4), "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    result = project.run("spectrum", *MODEL, "--weights", str(tmp_path / "evil.pt"), *DATA)
    line = _one_line(result.stderr)
    assert result.returncode == 1 and "refused: it would import io.open" in line and "state_dict()" in line
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)   # the file does run code when trusted
    assert marker.exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (("--model", "userpkg.models", *DATA), "expected MODULE:NAME"),
    (("--model", "userpkg.models:make_nett", *DATA), "userpkg.models has no attribute 'make_nett'"),
    (("--model", "userpkg.models:needs_width", *DATA), "TypeError"),
    ((*MODEL, "--weights", "missing.pt", *DATA), "--weights missing.pt: no such file"),
    ((*MODEL, "--data", "userpkg.data:stream"), "one-shot iterator"),
    ((*MODEL, "--data", "userpkg.data:inputs_only"), "returned a list of 3 tensors: return one (inputs, targets)"),
    ((*MODEL, *DATA, "--loss", "mse"), "--loss mse failed on the model's outputs (32, 3) float32"),
    ((*MODEL, *DATA, "--loss", "hinge"), "--loss 'hinge': use one of cross_entropy, mse"),
    ((*MODEL, *DATA, "--params", "fc.*"), "--params: params pattern 'fc.*' matches no parameter"),
    ((*MODEL, *DATA, "--device", "tpu"), "--device"),
], ids=["no-colon", "no-attribute", "factory-needs-arguments", "no-weights-file", "one-shot-data",
        "batches-without-targets", "loss-does-not-fit-targets", "unknown-loss", "params-match-nothing",
        "unknown-device"])
def test_loading_errors(project, monkeypatch, capsys, tmp_path, argv, expected):
    monkeypatch.chdir(project.root)
    assert main(["spectrum", *argv, "--out", str(tmp_path / "out")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert expected in line, line
    assert "(--debug shows the traceback)" in line


def test_a_weights_file_that_torch_did_not_write_is_named_as_such(project, monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("not weights")
    monkeypatch.chdir(project.root)
    assert main(["spectrum", *MODEL, "--weights", str(tmp_path / "notes.pt"), *DATA]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "not a state_dict file written by torch.save" in line and "refused" not in line


def test_a_weights_file_with_a_module_prefix_says_how_to_save_it(project, monkeypatch, capsys, tmp_path):
    state = {f"module.{k}": v for k, v in project.model().state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    monkeypatch.chdir(project.root)
    assert main(["layers", *MODEL, "--weights", str(tmp_path / "ddp.pt"), *DATA]) == 1
    line = _one_line(capsys.readouterr().err, "layers")
    assert "missing 0.weight, 0.bias, 2.weight and 1 more" in line and "model.module.state_dict()" in line


def test_argument_errors_are_usage_errors(project, monkeypatch, capsys):
    monkeypatch.chdir(project.root)
    with pytest.raises(SystemExit) as exit_:
        main(["sensitivity", *MODEL, *DATA, "--bits", "2,four"])
    assert exit_.value.code == 2 and "expected bit widths separated by commas" in capsys.readouterr().err
    assert main(["sensitivity", *MODEL, *DATA, "--granularity", "channel", "--avg-bits", "4"]) == 1
    assert "--avg-bits needs --granularity layer" in _one_line(capsys.readouterr().err, "sensitivity")
    assert main(["sensitivity", *MODEL, *DATA, "--bits", "2,4,8", "--avg-bits", "1"]) == 1
    assert "--avg-bits 1 is below the smallest of --bits 2,4,8" in _one_line(capsys.readouterr().err, "sensitivity")
    assert main(["landscape", *MODEL, *DATA, "--steps", "1"]) == 1
    assert "--steps must be at least 2" in _one_line(capsys.readouterr().err, "landscape")


def test_a_frontier_below_one_is_a_usage_error_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sensitivity", "--model", "x:y", "--data", "x:z", "--frontier", "0"])
    assert exit_info.value.code == 2
    assert "--frontier: must be a positive integer, got 0" in capsys.readouterr().err
