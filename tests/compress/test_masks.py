"""Weight masks against brute-force references: exact counts, deterministic ties, N:M groups, the radix path."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch

from curvkit.compress import masks
from curvkit.compress.masks import kth_smallest_magnitude, magnitude_masks, nm_masks, parse_nm


def _weights(seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    """Weights with many ties: rounded values, a block of zeros and repeated magnitudes of both signs."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 8, generator=g) * 4).round().to(dtype) / 4,
            torch.randn(4, 8, 3, 3, generator=g).to(dtype),
            torch.zeros(3, 4, dtype=dtype),
            torch.tensor([[0.5, -0.5], [0.25, -0.25]], dtype=dtype)]


def _reference_top_k(tensors: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Prune round(s n) entries: a stable sort of all magnitudes, so equal ones are pruned in order."""
    flat = torch.cat([t.abs().reshape(-1).double() for t in tensors])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = False
    return [k.view(t.shape) for k, t in zip(keep.split([t.numel() for t in tensors]), tensors)]


def test_module_examples_run():
    assert doctest.testmod(masks, raise_on_error=True).attempted > 0


@pytest.mark.parametrize("max_concat", [masks.MAX_CONCAT, 0], ids=["concatenated", "radix"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.5 + 1e-9, 0.77, 0.9, 0.999])
def test_global_top_k_prunes_exactly_round_s_n_with_ties_in_order(sparsity, max_concat):
    tensors = _weights()
    got = magnitude_masks(tensors, sparsity, max_concat=max_concat)
    expected = _reference_top_k(tensors, sparsity)
    assert [m.dtype for m in got] == [torch.bool] * len(tensors)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    n = sum(t.numel() for t in tensors)
    assert sum(int((~m).sum()) for m in got) == round(sparsity * n)


def test_global_top_k_keeps_every_larger_magnitude_than_it_prunes():
    tensors = _weights(1)
    got = magnitude_masks(tensors, 0.6)
    kept = torch.cat([t[m].abs() for t, m in zip(tensors, got)])
    pruned = torch.cat([t[~m].abs() for t, m in zip(tensors, got)])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_per_tensor_top_k_prunes_the_fraction_of_each_tensor(sparsity):
    tensors = _weights(2)
    got = magnitude_masks(tensors, sparsity, per_tensor=True)
    for t, m in zip(tensors, got):
        assert torch.equal(m, _reference_top_k([t], sparsity)[0])
        assert int((~m).sum()) == round(sparsity * t.numel())


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float64)], ids=["f32", "f64", "f16+f32", "bf16+f64"])
def test_radix_select_is_the_exact_kth_value(dtypes):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(300, 211, generator=g).to(dtypes[0]), torch.randn(5000, generator=g).to(dtypes[-1]),
               torch.randn(7, 3, generator=g).round().to(dtypes[0]), torch.zeros(5, dtype=dtypes[-1])]
    flat = torch.cat([t.abs().reshape(-1).double() for t in tensors])
    n = flat.numel()
    for k in (1, 5, 6, 1000, n // 2, n - 1, n):
        radix = kth_smallest_magnitude(tensors, k, max_concat=0)
        assert radix.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
        assert radix.double() == flat.kthvalue(k).values
        assert radix == kth_smallest_magnitude(tensors, k)


def test_radix_select_ranks_infinities_last():
    tensors = [torch.tensor([1.0, -float("inf"), 0.5]), torch.tensor([[2.0, float("inf")]])]
    assert kth_smallest_magnitude(tensors, 3, max_concat=0) == 2.0
    assert kth_smallest_magnitude(tensors, 5, max_concat=0) == float("inf")


def test_masks_leave_their_inputs_alone():
    tensors = _weights(4)
    before = [t.clone() for t in tensors]
    magnitude_masks(tensors, 0.5, max_concat=0)
    nm_masks([tensors[1]], "2:4")
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def _reference_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Loop over every group of m consecutive entries along dim 1; prune its m - n smallest, earlier first."""
    keep = torch.ones_like(weight, dtype=torch.bool)
    out, inputs, *kernel = weight.shape
    for o, rest in itertools.product(range(out), itertools.product(*map(range, kernel))):
        for start in range(0, inputs, m):
            group = [(o, start + j, *rest) for j in range(m)]
            ranked = sorted(range(m), key=lambda j: (abs(float(weight[group[j]])), j))
            for j in ranked[: m - n]:
                keep[group[j]] = False
    return keep


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("shape", [(5, 16), (3, 8, 2, 3), (2, 8, 3)], ids=["linear", "conv2d", "conv1d"])
def test_nm_keeps_the_n_largest_of_every_m_along_the_input_dimension(pattern, shape):
    n, m = parse_nm(pattern)
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(*shape, generator=g) * 2).round() / 2  # ties inside groups
    mask = nm_masks([weight], pattern)[0]
    assert torch.equal(mask, _reference_nm(weight, n, m))
    groups = mask.movedim(1, -1).reshape(-1, m)
    assert torch.equal(groups.sum(1), torch.full((groups.shape[0],), n))


def test_nm_groups_run_along_input_channels_of_a_conv():
    weight = torch.zeros(1, 4, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0])  # tap 0: keep channels 1 and 2
    weight[0, :, 0, 1] = torch.tensor([9.0, 0.0, 0.0, 8.0])  # tap 1: keep channels 0 and 3
    mask = nm_masks([weight], "2:4")[0]
    assert mask[0, :, 0, 0].tolist() == [False, True, True, False]
    assert mask[0, :, 0, 1].tolist() == [True, False, False, True]


def test_nm_rejects_a_layer_whose_input_dimension_is_not_a_multiple_of_m():
    with pytest.raises(ValueError, match=r"conv1\.weight has shape \(8, 3, 3, 3\).*3 is not a multiple of 4"):
        nm_masks([torch.ones(4, 8), torch.ones(8, 3, 3, 3)], "2:4", names=["fc.weight", "conv1.weight"])
    with pytest.raises(ValueError, match="tensor 0 has shape \\(8,\\): it has no dim 1"):
        nm_masks([torch.ones(8)], "2:4")


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "2-4", "a:b", 24])
def test_malformed_nm_patterns_are_rejected(pattern):
    with pytest.raises(ValueError, match="'N:M' with integers 0 < N < M"):
        parse_nm(pattern)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_zero_one_is_rejected(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
        magnitude_masks(_weights(), sparsity)


def test_bad_ranks_and_integer_tensors_are_rejected():
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        kth_smallest_magnitude([torch.ones(3)], 4)
    with pytest.raises(ValueError, match="floating-point"):
        kth_smallest_magnitude([torch.ones(3, dtype=torch.int64)], 1)
