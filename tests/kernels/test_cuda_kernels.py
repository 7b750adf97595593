"""The CUDA kernels against the references: they run wherever CUDA is (never on CI's CPU machines).

Until these tests have passed on a GPU, ``fused=None`` keeps CUDA tensors on the PyTorch path and
``fused=True`` warns; the dispatch half of that promise is tested here on any machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from curvkit import kernels
from curvkit.kernels import build, reference
from tests.kernels.conftest import assert_rel
from tests.kernels.test_cpu_kernels import DTYPES, KINDS, SHAPES, _adahessian_state, _curvature_options, _tensors

on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_cuda(*lists):
    return [[t.cuda() for t in ts] for ts in lists]


def test_fused_none_keeps_cuda_on_the_pytorch_path_and_fused_true_warns(monkeypatch):
    monkeypatch.setattr(build, "loaded", lambda kind: True)
    assert kernels.use_kernels("cuda", None) is False
    assert kernels.use_kernels("cpu", None) is True
    kernels._warn_unverified.cache_clear()
    with pytest.warns(RuntimeWarning, match="not yet been verified"):
        assert kernels.use_kernels(torch.device("cuda"), True) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.use_kernels("cuda", True)                      # once per process


@pytest.mark.cuda
@on_cuda
@pytest.mark.filterwarnings("ignore:fused=True runs curvkit's cuda kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**63 + 5)])
def test_rademacher_is_bit_identical_to_the_reference(dtype, seed, offset):
    like = [torch.empty(s, dtype=dtype, device="cuda") for s in SHAPES]
    for a, b in zip(kernels.rademacher(like, seed, offset, fused=True), reference.rademacher(like, seed, offset)):
        assert a.is_cuda and torch.equal(a, b)


@pytest.mark.cuda
@on_cuda
@pytest.mark.filterwarnings("ignore:fused=True runs curvkit's cuda kernels")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curvature_kind", KINDS)
def test_adahessian_step_matches_the_reference(dtype, curvature_kind):
    ours = _on_cuda(*_adahessian_state(dtype, curvature_kind))
    ref = _on_cuda(*_adahessian_state(dtype, curvature_kind))
    options = _curvature_options(dtype, curvature_kind) if curvature_kind != "none" else {}
    if options.get("probes") is not None:
        options["probes"] = [z.cuda() for z in options["probes"]]
    args = (0.15, 0.9, 0.999, 1e-4, 0.01, 0.5, [0.1] * len(SHAPES), [0.01] * len(SHAPES))
    kernels.adahessian_step_(*ours, *args, **options, fused=True)
    reference.adahessian_step_(*ref, *args, **options)
    for mine, theirs in zip(ours[:4], ref[:4]):
        assert_rel(mine, theirs, 1e-6)


@pytest.mark.cuda
@on_cuda
@pytest.mark.filterwarnings("ignore:fused=True runs curvkit's cuda kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sophia_step_accumulate_zhz_and_softmax_product_match_the_reference(dtype):
    state = [_tensors(dtype, s) for s in range(9, 14)]
    ours, ref = _on_cuda(*state), _on_cuda(*state)
    args = (0.01, 0.965, 0.99, 0.04, 1e-12, 0.1)
    kernels.sophia_step_(*ours, *args, fused=True)
    reference.sophia_step_(*ref, *args)
    for mine, theirs in zip(ours[:4], ref[:4]):
        assert_rel(mine, theirs, 1e-6)
    hz = _on_cuda(_tensors(dtype, 1))[0]
    acc, acc_ref = _on_cuda(_tensors(dtype, 2), _tensors(dtype, 2))
    dots = kernels.accumulate_zhz_(acc, hz, 99, 4, 0.5, True, fused=True)
    dots_ref = reference.accumulate_zhz_(acc_ref, hz, 99, 4, 0.5, True)
    assert_rel(acc, acc_ref, 1e-6)
    torch.testing.assert_close(dots.cpu(), dots_ref.cpu(), rtol=1e-6, atol=1e-6)
    logits, u = 3 * torch.randn(33, 10, dtype=dtype, device="cuda"), torch.randn(33, 10, dtype=dtype, device="cuda")
    assert_rel([kernels.softmax_ce_hessian_product(logits, u, 0.25, fused=True)],
               [reference.softmax_ce_hessian_product(logits, u, 0.25)], 1e-6)
