"""The command line as a user runs it: the console script and ``python -m curvkit``, in subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import curvkit
from curvkit.cli import COMMANDS

# the commands below need no kernels; the console script imports the curvkit under test (this checkout)
ENV = {**os.environ, "CURVKIT_KERNELS": "0", "PYTHONPATH": str(Path(curvkit.__file__).parents[1])}


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize("prefix", [[sys.executable, "-m", "curvkit"], ["curvkit"]])
def test_help_lists_every_subcommand(prefix):
    if prefix == ["curvkit"] and shutil.which("curvkit") is None:
        pytest.fail("the curvkit console script is not installed: pip install -e . declares it in setup.cfg")
    out = _run(*prefix, "--help")
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in COMMANDS), out.stdout


def test_unknown_command_and_missing_arguments_fail_with_usage():
    out = _run(sys.executable, "-m", "curvkit", "spectrumm")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = _run(sys.executable, "-m", "curvkit", "kernels")
    assert out.returncode == 2 and "action" in out.stderr


def test_kernels_info_and_the_old_module_alias():
    for module in (["curvkit", "kernels"], ["curvkit.kernels"]):
        out = _run(sys.executable, "-m", *module, "info")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("cpu") and "off (CURVKIT_KERNELS=0)" in out.stdout
