"""Every CPU kernel against its pure-PyTorch reference (1e-6 relative, float32 and float64), probes bit for bit."""

from __future__ import annotations

import pytest
import torch

from curvkit import kernels
from curvkit.kernels import reference
from tests.kernels.conftest import assert_rel

pytestmark = pytest.mark.usefixtures("cpu_kernels")
DTYPES = [torch.float32, torch.float64]
# shapes of one group: a conv weight, odd sizes that straddle the 128-probe Philox blocks, a scalar
SHAPES = [(6, 3, 3, 3), (130,), (7, 5), (1,), (257, 3)]


def _tensors(dtype, seed=0, positive=False, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    make = torch.rand if positive else torch.randn
    return [make(s, generator=g, dtype=dtype) for s in shapes]


def _twins(*lists):
    return [[t.clone() for t in ts] for ts in lists], [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_is_bit_identical_to_the_reference(dtype):
    for seed, offset in [(0, 0), (123456789, 17), (2**64 - 1, 2**63 + 5)]:
        ours, ref = _tensors(dtype), _tensors(dtype)
        kernels.rademacher_(ours, seed, offset, fused=True)
        reference.rademacher_(ref, seed, offset)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_new_probe_tensors_are_bit_identical_and_plain(dtype):
    like = [t.requires_grad_() for t in _tensors(dtype)]
    ours = kernels.rademacher(like, 31, 7, fused=True)             # grad mode on: still plain tensors
    for a, b, t in zip(ours, reference.rademacher(like, 31, 7), like):
        assert torch.equal(a, b) and a.shape == t.shape and a.dtype == dtype
        assert a.is_contiguous() and not a.requires_grad


def test_mixed_dtypes_fall_back_to_the_reference():
    like = [torch.zeros(3, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)]
    z = kernels.rademacher(like, 1, 2)
    assert [t.dtype for t in z] == [torch.float32, torch.float64]
    flat = reference.rademacher_flat(5, 1, 2, torch.float64)
    assert torch.equal(torch.cat([t.double() for t in z]), flat)
    with pytest.raises(RuntimeError, match="must be a contiguous Float tensor"):
        kernels.rademacher(like, 1, 2, fused=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha, accumulate", [(1.0, False), (0.25, False), (1.0, True), (0.5, True)])
def test_accumulate_zhz_matches_the_reference(dtype, alpha, accumulate):
    hz = _tensors(dtype, seed=1)
    (acc,), (acc_ref,) = _twins(_tensors(dtype, seed=2))
    dots = kernels.accumulate_zhz_(acc, hz, 99, 4, alpha, accumulate, fused=True)
    dots_ref = reference.accumulate_zhz_(acc_ref, hz, 99, 4, alpha, accumulate)
    assert_rel(acc, acc_ref, 1e-6)
    assert dots.dtype == torch.float64 and dots.shape == (len(SHAPES),)
    scale = torch.stack([h.abs().sum(dtype=torch.float64) for h in hz])  # the dots' cancellation-free scale
    assert ((dots - dots_ref).abs() <= 1e-6 * scale).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_zhz_in_place_over_hz(dtype):
    hz = _tensors(dtype, seed=3)
    ours, ref = [h.clone() for h in hz], [h.clone() for h in hz]
    kernels.accumulate_zhz_(ours, ours, 5, 6, 1.0, accumulate=False, fused=True)
    reference.accumulate_zhz_(ref, ref, 5, 6, 1.0, accumulate=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)  # z * hz with z = +-1 is exact


WINDOWS = [9, 1, 1, 1, 1]   # the conv weight's 3x3 kernel window


def _adahessian_state(dtype, curvature_kind):
    params, grads, exp_avg = _tensors(dtype, 4), _tensors(dtype, 5), _tensors(dtype, 6)
    exp_sq = _tensors(dtype, 7, positive=True)
    curvature = [] if curvature_kind == "none" else _tensors(dtype, 8)
    return params, grads, exp_avg, exp_sq, curvature


def _curvature_options(dtype, curvature_kind):
    """``probes``/``windows`` for a kind: elementwise D, probed (D = z * Hz), windowed, or both."""
    like = [torch.empty(s, dtype=dtype) for s in SHAPES]
    probes = reference.rademacher(like, 3, 1) if "probed" in curvature_kind else None
    windows = WINDOWS if "windowed" in curvature_kind else None
    return dict(probes=probes, windows=windows)


KINDS = ["elementwise", "probed", "windowed", "probed+windowed", "none"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curvature_kind", KINDS)
@pytest.mark.parametrize("hessian_power, weight_decay, beta1", [(1.0, 0.0, 0.9), (0.5, 0.01, 0.9), (0.7, 0.1, 0.3)])
def test_adahessian_step_matches_the_reference(dtype, curvature_kind, hessian_power, weight_decay, beta1):
    ours, ref = _twins(*_adahessian_state(dtype, curvature_kind))
    options = _curvature_options(dtype, curvature_kind) if curvature_kind != "none" else {}
    bc1 = [1 - beta1 ** (j + 1) for j in range(len(SHAPES))]        # per-tensor bias corrections
    bc2 = [1 - 0.999 ** (j + 2) for j in range(len(SHAPES))]
    args = (0.15, beta1, 0.999, 1e-4, weight_decay, hessian_power, bc1, bc2)
    kernels.adahessian_step_(*ours, *args, **options, fused=True)
    reference.adahessian_step_(*ref, *args, **options)
    for mine, theirs in zip(ours[:4], ref[:4]):
        assert_rel(mine, theirs, 1e-6)


def test_windows_average_the_estimate_over_each_kernel_window():
    p, g, m = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1, 3)
    v = torch.zeros(2, 1, 3)
    hz = torch.tensor([[[1.0, 2.0, 6.0]], [[-3.0, 0.0, 0.0]]])
    z = reference.rademacher([p], 5, 0)[0]
    kernels.adahessian_step_([p], [g], [m], [v], [hz], 0.1, 0.9, 0.5, 1e-4, 0.0, 1.0, [0.1], [0.5],
                             probes=[z], windows=[3], fused=True)
    d = (z * hz).mean(2, keepdim=True).expand(2, 1, 3)
    torch.testing.assert_close(v, 0.5 * d * d)


@pytest.mark.parametrize("windows, match", [([4, 1, 1, 1, 1], "does not divide"), ([9], "entries, expected")])
def test_bad_windows_are_refused(windows, match):
    ours, _ = _twins(*_adahessian_state(torch.float32, "elementwise"))
    with pytest.raises(RuntimeError, match=match):
        kernels.adahessian_step_(*ours, 0.1, 0.9, 0.999, 1e-4, 0.0, 1.0, [0.1] * 5, [0.1] * 5, windows=windows,
                                 fused=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("curvature_kind", ["elementwise", "probed", "none"])
@pytest.mark.parametrize("weight_decay, beta1", [(0.0, 0.965), (0.1, 0.2)])
def test_sophia_step_matches_the_reference(dtype, curvature_kind, weight_decay, beta1):
    params, grads, exp_avg, hessian = _tensors(dtype, 9), _tensors(dtype, 10), _tensors(dtype, 11), _tensors(dtype, 12)
    curvature = [] if curvature_kind == "none" else _tensors(dtype, 13)
    probes = _curvature_options(dtype, curvature_kind)["probes"]
    ours, ref = _twins(params, grads, exp_avg, hessian, curvature)
    args = (0.01, beta1, 0.99, 0.04, 1e-12, weight_decay)
    kernels.sophia_step_(*ours, *args, probes=probes, fused=True)
    reference.sophia_step_(*ref, *args, probes=probes)
    for mine, theirs in zip(ours[:4], ref[:4]):
        assert_rel(mine, theirs, 1e-6)


def test_sophia_keeps_nan_like_torch():
    p, m, h = torch.ones(3), torch.zeros(3), torch.tensor([1.0, float("nan"), 1.0])
    kernels.sophia_step_([p], [torch.ones(3)], [m], [h], [], 0.1, 0.9, 0.99, 0.04, 1e-12, 0.0, fused=True)
    assert p.isnan().tolist() == [False, True, False]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, classes", [(33, 10), (4, 1000), (1, 1)])
def test_softmax_ce_hessian_product_matches_the_reference(dtype, rows, classes):
    g = torch.Generator().manual_seed(rows)
    logits = 3 * torch.randn(rows, classes, generator=g, dtype=dtype)
    u = torch.randn(rows, classes, generator=g, dtype=dtype)
    ours = kernels.softmax_ce_hessian_product(logits, u, 0.25, fused=True)
    assert_rel([ours], [reference.softmax_ce_hessian_product(logits, u, 0.25)], 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float(dtype):
    ours = _adahessian_state(dtype, "probed+windowed")
    ref = [[t.float() for t in ts] for ts in ours]
    args = (0.15, 0.9, 0.999, 1e-4, 0.01, 1.0, [0.1] * len(SHAPES), [0.01] * len(SHAPES))
    options = _curvature_options(dtype, "probed+windowed")
    kernels.adahessian_step_(*ours, *args, **options, fused=True)
    reference.adahessian_step_(*ref, *args, probes=[z.float() for z in options["probes"]], windows=WINDOWS)
    for mine, theirs in zip(ours[:4], ref[:4]):
        assert_rel([t.float() for t in mine], theirs, 1e-2)


def test_threads_split_large_groups_without_changing_results():
    shapes = [(300_000,), (70_000,), (5,)]
    state = [_tensors(torch.float32, s, shapes=shapes) for s in range(4)]
    state[3] = [t.abs() for t in state[3]]
    curvature = _tensors(torch.float32, 9, shapes=shapes)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            tensors = [[t.clone() for t in ts] for ts in state]
            kernels.adahessian_step_(*tensors, curvature, 0.1, 0.9, 0.999, 1e-4, 0.0, 1.0, [0.1] * 3, [0.01] * 3,
                                     windows=[1, 7, 5], fused=True)
            z = [torch.empty(s, dtype=torch.float32) for s in shapes]
            kernels.rademacher_(z, 1, 2, fused=True)
            dots = kernels.accumulate_zhz_(z, curvature, 1, 2, fused=True)
            results.append((tensors, z, dots))
    finally:
        torch.set_num_threads(threads)
    (one, z1, d1), (two, z2, d2) = results
    assert all(torch.equal(a, b) for xs, ys in zip(one, two) for a, b in zip(xs, ys))
    assert all(torch.equal(a, b) for a, b in zip(z1, z2)) and torch.equal(d1, d2)  # dots: fixed summation order


def test_in_place_ops_bump_version_counters():
    p = torch.ones(4, requires_grad=True)
    y = (p * p).sum()
    with torch.no_grad():
        kernels.rademacher_([p], 0, 0, fused=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_refused_arguments_fall_back_or_explain():
    p = torch.randn(4, 3).t()                      # not contiguous
    m, v, g = torch.zeros(3, 4), torch.ones(3, 4), torch.ones(3, 4)
    p_ref = p.clone()

    def args():
        return [g], [m.clone()], [v.clone()], [], 0.1, 0.9, 0.999, 1e-4, 0.0, 1.0, [0.1], [0.01]

    kernels.adahessian_step_([p], *args())         # fused=None: the reference takes it
    reference.adahessian_step_([p_ref], *args())
    assert torch.equal(p, p_ref)
    with pytest.raises(RuntimeError, match="must be a contiguous"):
        kernels.adahessian_step_([p], *args(), fused=True)
    with pytest.raises(RuntimeError, match="exp_avg has 2 tensors, expected 1"):
        torch.ops.curvkit.sophia_step_([g], [g], [m, m], [v], [], [], [], 0, 0, 0.1, 0.9, 0.99, 0.04, 1e-12, 0.0)
    with pytest.raises(RuntimeError, match="curvature\\[0\\] has 5 elements, expected 12"):
        torch.ops.curvkit.adahessian_step_([g], [g], [m], [v], [torch.ones(5)], [], [], [], 0, 0, 0.1, 0.9, 0.999,
                                           1e-4, 0.0, 1.0, [0.1], [0.01])
    with pytest.raises(RuntimeError, match="probes need a curvature"):
        torch.ops.curvkit.sophia_step_([g], [g], [m], [v], [], [g], [], 0, 0, 0.1, 0.9, 0.99, 0.04, 1e-12, 0.0)
    before = g.clone()
    with pytest.raises(RuntimeError, match="next_probes\\[0\\] has 5 elements"):  # refused before any update
        torch.ops.curvkit.sophia_step_([g], [g], [m], [v], [], [], [torch.ones(5)], 0, 0, 0.1, 0.9, 0.99, 0.04,
                                       1e-12, 0.0)
    assert torch.equal(g, before)
