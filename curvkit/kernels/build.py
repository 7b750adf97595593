"""Build and load csrc/ as torch operators (``torch.ops.curvkit``): JIT with ninja at first use, cached.

Two shared libraries: ``curvkit_kernels_cpu`` (defines the ops, CPU kernels) and, only where
``torch.cuda.is_available()``, ``curvkit_kernels_cuda`` (CUDA kernels, built by nvcc), from the sources
that ship in the package (``curvkit/csrc``). They are built once per torch version into
``$CURVKIT_BUILD_DIR``, else ``$TORCH_EXTENSIONS_DIR/curvkit``, else ``~/.cache/curvkit``, and later
processes only load them (ninja rebuilds when a source changes). A build that fails is reported by
one warning per library and process; callers then use the pure-PyTorch references. ``CURVKIT_KERNELS=0``
turns the kernels off without a warning.

    python -m curvkit.kernels build     # ahead of time (prints where and how long)
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from pathlib import Path

import torch

# The kernel sources ship inside the package (curvkit/csrc; in a source checkout a link to the top-level csrc/),
# so an installed wheel builds its kernels as a checkout does. Resolved, so a checkout keeps its build cache.
SOURCE_DIR = (Path(__file__).resolve().parents[1] / "csrc").resolve()
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
CUDA_CFLAGS = ["-O3"]
LIBRARIES = ("cpu", "cuda")

_lock = threading.RLock()
_loaded: dict[str, bool] = {}
_errors: dict[str, str] = {}


def build_dir(kind: str) -> Path:
    """Where library ``kind`` ("cpu" or "cuda") is built: one folder per torch and Python version."""
    root = os.environ.get("CURVKIT_BUILD_DIR")
    if root is None and os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "curvkit")
    root = Path(root or Path.home() / ".cache" / "curvkit")
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
    return root / tag / kind


def disabled() -> bool:
    """True when ``CURVKIT_KERNELS=0`` (or ``off``/``false``) turns the compiled kernels off."""
    value = os.environ.get("CURVKIT_KERNELS")
    return value is not None and value.strip().lower() in ("0", "off", "false", "no")


def _compile(kind: str, verbose: bool) -> None:
    """Build (if needed) and load one library; raises on any failure."""
    from torch.utils import cpp_extension

    source = SOURCE_DIR / ("curvkit_kernels.cpp" if kind == "cpu" else "curvkit_kernels.cu")
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: this curvkit was installed without its kernel sources; "
                                "reinstall it (pip install curvkit, or pip install . from a checkout)")
    cpp_extension.verify_ninja_availability()
    directory = build_dir(kind)
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"curvkit_kernels_{kind}", sources=[str(source)], extra_cflags=CFLAGS,
        extra_cuda_cflags=CUDA_CFLAGS if kind == "cuda" else None, extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(SOURCE_DIR)], build_directory=str(directory), verbose=verbose,
        with_cuda=kind == "cuda", is_python_module=False,
    )


def loaded(kind: str) -> bool:
    """True when library ``kind`` is loaded and not turned off: the cheap check made before every op."""
    return _loaded.get(kind, False) and not disabled()


def load(kind: str, verbose: bool = False) -> bool:
    """Load library ``kind`` ("cpu" or "cuda"), building it on first use; False (and one warning) on failure.

    The CUDA library registers kernels for ops that the CPU library defines, so it loads that one first.
    """
    if kind not in LIBRARIES:
        raise ValueError(f"kind must be one of {LIBRARIES}, got {kind!r}")
    if disabled():
        return False
    if kind in _loaded:
        return _loaded[kind]
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind == "cuda" and not torch.cuda.is_available():
            _loaded[kind] = False
            return False
        try:
            if kind == "cuda" and not load("cpu", verbose):
                raise RuntimeError("the CPU library, which defines the ops, is unavailable")
            _compile(kind, verbose)
            _loaded[kind] = True
        except Exception as exc:  # any build or load failure means: use the references
            _loaded[kind] = False
            _errors[kind] = f"{type(exc).__name__}: {exc}".strip()
            warnings.warn(
                f"curvkit: the fused {kind.upper()} kernels could not be built or loaded, so the pure-PyTorch "
                f"path is used (same results, slower). Reason: {_errors[kind][:2000]}. "
                f"Build them with `python -m curvkit.kernels build --verbose` (needs ninja and a C++17 compiler"
                f"{', and nvcc' if kind == 'cuda' else ''}), or set CURVKIT_KERNELS=0 to silence this.",
                RuntimeWarning, stacklevel=3,
            )
        return _loaded[kind]


def error(kind: str) -> str | None:
    """Why library ``kind`` failed to build or load (None if it did not fail)."""
    return _errors.get(kind)
