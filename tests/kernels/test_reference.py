"""The pure-PyTorch references: Philox known answers, the probe layout, and the update rules by hand."""

from __future__ import annotations

import math

import pytest
import torch

from curvkit.kernels import reference


def _words(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [
    # Random123's known-answer vectors for philox4x32_10 (kat_vectors)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_the_published_known_answers(counter, key, expected):
    assert tuple(int(w) for w in reference.philox4x32_10(_words(*counter), key)) == expected
    assert tuple(int(w) for w in reference.philox4x32_10(list(counter), key)) == expected  # plain ints too


def test_probe_layout_is_the_documented_one():
    seed, offset = 0x1234_5678_9ABC_DEF0, 2**40 + 3
    z = reference.rademacher_flat(300, seed, offset, torch.float64)
    for g in (0, 1, 31, 32, 127, 128, 200, 299):
        block = g // 128
        words = reference.philox4x32_10([block & 0xFFFFFFFF, block >> 32, offset & 0xFFFFFFFF, offset >> 32],
                                        (seed & 0xFFFFFFFF, seed >> 32))
        bit = (int(words[(g // 32) % 4]) >> (g % 32)) & 1
        assert z[g].item() == (-1.0 if bit else 1.0)


def test_probes_number_a_list_as_one_vector_and_differ_between_offsets():
    flat = reference.rademacher_flat(50, 7, 0, torch.float32)
    for split in ([50], [10, 40], [1, 48, 1]):
        out = [torch.empty(n) for n in split]
        reference.rademacher_(out, 7, 0)
        assert torch.equal(torch.cat(out), flat)
    assert not torch.equal(reference.rademacher_flat(50, 7, 1), flat)
    assert not torch.equal(reference.rademacher_flat(50, 8, 0), flat)


def test_probes_are_balanced_and_uncorrelated():
    n = 200_000
    z = reference.rademacher_flat(n, 3, 5, torch.float64)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    tol = 5 / math.sqrt(n)
    assert abs(z.mean().item()) < tol
    for lag in (1, 31, 32, 127, 128):
        assert abs((z[:-lag] * z[lag:]).mean().item()) < tol
    other = reference.rademacher_flat(n, 3, 6, torch.float64)
    assert abs((z * other).mean().item()) < tol


def test_seed_and_offset_must_fit_64_bits():
    with pytest.raises(ValueError, match="2\\^64"):
        reference.rademacher_flat(4, -1, 0)
    with pytest.raises(ValueError, match="2\\^64"):
        reference.rademacher_flat(4, 0, 2**64)


def test_accumulate_zhz_by_hand():
    hz = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0, 5.0]])]
    z = reference.rademacher_flat(5, 11, 2, torch.float64)
    acc = [torch.ones(3), torch.ones(1, 2)]
    dots = reference.accumulate_zhz_(acc, hz, 11, 2, alpha=0.5)
    zhz = z * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(torch.cat([a.flatten() for a in acc]), 1 + 0.5 * zhz)
    torch.testing.assert_close(dots, torch.stack([zhz[:3].sum(), zhz[3:].sum()]))
    same = [h.clone() for h in hz]
    reference.accumulate_zhz_(same, same, 11, 2, accumulate=False)   # in place over hz itself
    torch.testing.assert_close(torch.cat([a.flatten() for a in same]), zhz)


def test_adahessian_step_by_hand_with_probes_and_windows():
    p, g = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    m, v = torch.zeros(2, 2), torch.ones(2, 2)
    hz, z = torch.tensor([[1.0, -3.0], [-4.0, -2.0]]), torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    # D = z * hz = [[1, 3], [-4, -2]], averaged over windows of 2: [[2, 2], [-3, -3]]
    lr, b1, b2, eps, wd, k, bc1, bc2 = 0.1, 0.9, 0.99, 1e-3, 0.01, 0.5, 0.19, 0.0199
    expected_m = 0.1 * g
    expected_v = 0.99 + 0.01 * torch.tensor([[4.0, 4.0], [9.0, 9.0]])
    expected_p = p * (1 - lr * wd) - lr / bc1 * expected_m / ((expected_v / bc2) ** (k / 2) + eps)
    reference.adahessian_step_([p], [g], [m], [v], [hz], lr, b1, b2, eps, wd, k, [bc1], [bc2], probes=[z],
                               windows=[2])
    torch.testing.assert_close(m, expected_m)
    torch.testing.assert_close(v, expected_v)
    torch.testing.assert_close(p, expected_p)


def test_sophia_step_by_hand():
    p, g = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, -0.001, 0.0])
    m, h = torch.zeros(3), torch.tensor([1.0, 1.0, -5.0])
    d = torch.tensor([1.0, 1.0, 1.0])
    reference.sophia_step_([p], [g], [m], [h], [d], lr=0.1, beta1=0.0, beta2=0.5, rho=1.0, eps=1e-12,
                           weight_decay=0.0)
    torch.testing.assert_close(h, torch.tensor([1.0, 1.0, -2.0]))
    # m = g; ratio = clip(m / max(h, eps), 1) = (1, -0.001, 0)
    torch.testing.assert_close(p, torch.tensor([0.9, 1.0001, 1.0]))


def test_softmax_ce_hessian_product_is_the_cross_entropy_output_hessian():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    u = torch.randn(3, 5, generator=g, dtype=torch.float64)
    out = reference.softmax_ce_hessian_product(logits, u, 1 / 3)
    exact = torch.autograd.functional.hessian(lambda z: torch.nn.functional.cross_entropy(z, torch.tensor([0, 1, 2])),
                                              logits).reshape(15, 15)
    torch.testing.assert_close(out.reshape(-1), exact @ u.reshape(-1))
