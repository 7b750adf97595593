"""Building: the fallback when a build fails, the off switch, the ahead-of-time command, and nvcc on every .cu."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from curvkit import kernels
from curvkit.cli import main
from curvkit.kernels import build, reference


@pytest.fixture
def fresh_build_state(monkeypatch):
    """A process that has not tried to build yet (the real state comes back afterwards)."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_errors", {})
    monkeypatch.delenv("CURVKIT_KERNELS", raising=False)


def test_a_failed_build_warns_once_and_the_reference_path_still_works(fresh_build_state, monkeypatch):
    def broken(kind, verbose):
        raise RuntimeError("Error building extension 'curvkit_kernels_cpu': g++ not found")

    monkeypatch.setattr(build, "_compile", broken)
    p, g, m, v = torch.ones(5), torch.full((5,), 0.5), torch.zeros(5), torch.zeros(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.available() == {"cpu": False, "cuda": False}
        assert kernels.available() == {"cpu": False, "cuda": False}
        kernels.adahessian_step_([p], [g], [m], [v], [torch.ones(5)], 0.1, 0.9, 0.999, 1e-4, 0.0, 1.0, [0.1], [0.001])
        z = [torch.empty(3)]
        kernels.rademacher_(z, 1, 0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "CPU kernels could not be built" in messages[0] and "g++ not found" in messages[0]
    assert "pure-PyTorch path" in messages[0] and "CURVKIT_KERNELS=0" in messages[0]
    expected = torch.ones(5) - 0.1 / 0.1 * 0.05 / ((0.001 / 0.001) ** 0.5 + 1e-4)
    torch.testing.assert_close(p, expected)
    assert torch.equal(z[0], reference.rademacher_flat(3, 1, 0, z[0].dtype))
    assert "g++ not found" in build.error("cpu")


def test_the_off_switch_skips_the_build_silently(fresh_build_state, monkeypatch):
    monkeypatch.setenv("CURVKIT_KERNELS", "0")
    monkeypatch.setattr(build, "_compile", lambda kind, verbose: pytest.fail("must not build"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available() == {"cpu": False, "cuda": False}
    with pytest.raises(RuntimeError, match="CURVKIT_KERNELS=0"):
        kernels.use_kernels("cpu", fused=True)


def test_build_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CURVKIT_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_dir("cpu").parent.parent == tmp_path / "curvkit"
    monkeypatch.setenv("CURVKIT_BUILD_DIR", str(tmp_path / "mine"))
    where = build.build_dir("cuda")
    assert where.parent.parent == tmp_path / "mine" and where.name == "cuda"
    assert torch.__version__.split("+")[0] in where.parent.name


def test_ahead_of_time_build_command(cpu_kernels, capsys):
    assert main(["kernels", "build"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "ready" in out and str(build.build_dir("cpu")) in out


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None:
        home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME or "/usr/local/cuda"
        found = shutil.which(os.path.join(home, "bin", "nvcc"))
    return found


CUDA_SOURCES = sorted(build.SOURCE_DIR.glob("*.cu"))


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (not on PATH, in CUDA_HOME or /usr/local/cuda)")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_every_cuda_source_compiles_with_nvcc(source, tmp_path):
    """``nvcc -c`` against torch's headers with torch's own extension flags (one architecture, to stay fast).

    A CPU-only torch wheel ships c10/cuda headers but not the CMake-generated cuda_cmake_macros.h;
    a one-line stand-in is put on the include path when it is missing.
    """
    includes = [f"-I{build.SOURCE_DIR}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    generated = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():
        stand_in = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stand_in.parent.mkdir(parents=True)
        stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp_path / 'include'}")
    command = [_nvcc(), "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++20", "-arch=sm_80",
               "-Xcompiler", "-fPIC", *build.CUDA_CFLAGS, *cpp_extension.COMMON_NVCC_FLAGS, *includes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]
