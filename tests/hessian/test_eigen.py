"""Lanczos eigenvalues against exact dense spectra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import HessianOperator, eigenvalues
from tests._models import spectrum_matrix


def test_extreme_eigenvalues_of_networks_match_dense(model_and_hessian):
    model, data, D = model_and_hessian
    exact = torch.linalg.eigvalsh(D)
    H = HessianOperator(model, F.cross_entropy, data)
    top = eigenvalues(H, k=3, seed=0)
    bottom = eigenvalues(H, k=2, which="SA", seed=1)
    mag = eigenvalues(H, k=1, which="LM", seed=2)
    assert top.converged and bottom.converged and mag.converged
    torch.testing.assert_close(top.values, exact.flip(0)[:3], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(bottom.values, exact[:2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mag.values, exact[exact.abs().argmax()].reshape(1), rtol=1e-6, atol=1e-9)
    # returned vectors are unit eigenvectors with the reported residuals
    R = D @ top.vectors - top.vectors * top.values
    torch.testing.assert_close(R.norm(dim=0), top.residuals, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(top.vectors.norm(dim=0), torch.ones(3))


def test_product_budget_for_top1_and_top5():
    """Top-1 to 1e-6 within 20 products, top-5 within 45, on a spectrum with a 0.92 gap ratio."""
    eigs = torch.cat([torch.tensor([10.0, 9.2, 8.5, 7.9, 7.4]), torch.linspace(-1.0, 6.0, 295)])
    A = spectrum_matrix(eigs, seed=3)
    one = eigenvalues(A, k=1, seed=0)
    five = eigenvalues(A, k=5, seed=0)
    assert one.converged and five.converged
    assert one.matvecs <= 20 and five.matvecs <= 45, (one.matvecs, five.matvecs)
    assert abs(one.values[0] - 10.0) <= 1e-6 * 10.0
    torch.testing.assert_close(five.values, eigs[:5], rtol=1e-6, atol=0)


def test_converged_is_honest_when_the_budget_is_too_small():
    eigs = torch.linspace(1.0, 2.0, 200)
    A = spectrum_matrix(eigs, seed=0)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        res = eigenvalues(A, k=1, max_matvecs=5, seed=0)
    assert not res.converged and res.matvecs == 5
    assert abs(res.values[0] - 2.0) <= res.residuals[0] + 1e-12  # the residual bounds the error


def test_invariant_subspace_gives_exact_answer():
    A = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    res = eigenvalues(A, k=1, seed=0)
    assert res.converged and res.matvecs <= 2
    torch.testing.assert_close(res.values, torch.tensor([3.0]))


def test_same_seed_same_result_and_float32_operator():
    A = spectrum_matrix(torch.linspace(-2, 5, 60), seed=1)
    a, b = eigenvalues(A, k=2, seed=7), eigenvalues(A, k=2, seed=7)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    c = eigenvalues(A.float(), k=2, seed=7)
    torch.testing.assert_close(c.values, a.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=60), "smaller than the operator size"),
    (dict(k=0), "positive integer"),
    (dict(which="BE"), "which must be"),
    (dict(tol=0), "tol must be positive"),
    (dict(k=3, max_matvecs=3), "too small"),
])
def test_bad_arguments_raise(kwargs, match):
    A = spectrum_matrix(torch.linspace(0, 1, 60))
    with pytest.raises(ValueError, match=match):
        eigenvalues(A, **kwargs)


def test_the_basis_grows_with_the_recurrence_in_small_chunks(monkeypatch):
    import curvkit.hessian.lanczos as lanczos_module

    monkeypatch.setattr(lanczos_module, "CHUNK_BYTES", 1)        # force 4-vector chunks, as for a large model
    eigs = torch.cat([torch.tensor([50.0, 40.0]), torch.linspace(0.0, 1.0, 398)])
    H = spectrum_matrix(eigs.double(), seed=3)
    seen = {}
    original = lanczos_module.Lanczos.step

    def spy(self):
        original(self)
        seen["allocated"] = sum(c.shape[1] for c in self._chunks)
        seen["stored"] = self.stored

    monkeypatch.setattr(lanczos_module.Lanczos, "step", spy)
    res = eigenvalues(H, k=2, tol=1e-10, seed=0)
    torch.testing.assert_close(res.values, torch.tensor([50.0, 40.0], dtype=torch.float64), rtol=1e-9, atol=0)
    assert res.matvecs < 100 and seen["stored"] == res.matvecs + 1
    assert seen["allocated"] - seen["stored"] < 4          # never more than 3 vectors beyond those in use


def test_a_float32_basis_halves_memory_and_keeps_seven_digits():
    eigs = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-1.0, 1.0, 198)])
    H = spectrum_matrix(eigs.double(), seed=4)
    res = eigenvalues(H, k=2, tol=1e-6, seed=0, basis_dtype=torch.float32)
    torch.testing.assert_close(res.values, torch.tensor([10.0, 9.0], dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="basis_dtype"):
        eigenvalues(H, k=1, basis_dtype=torch.float16)
