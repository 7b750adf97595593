"""The compiled CPU kernels, built (or loaded from the on-disk cache) once per session."""

from __future__ import annotations

import pytest

from curvkit.kernels import build


@pytest.fixture(scope="session")
def cpu_kernels():
    """Fails (not skips) when the CPU library cannot be built: CI must build and test it."""
    if build.disabled():
        pytest.skip("CURVKIT_KERNELS=0 turns the compiled kernels off")
    assert build.load("cpu"), f"the CPU kernels failed to build: {build.error('cpu')}"


def assert_rel(actual, expected, rtol: float) -> None:
    """max |actual - expected| <= rtol * max |expected|, tensor by tensor.

    Relative to each tensor's scale rather than element by element: an update p - lr m / denom that
    nearly cancels has a tiny result whose own relative error says nothing about the kernel.
    """
    for j, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, j
        err = (a - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        assert err <= rtol * scale or err == 0.0, f"tensor {j}: max error {err:.3g} vs scale {scale:.3g}"
