"""cg and steihaug against dense float64 solves and brute-force trust-region solutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvkit.hessian import HessianOperator, SolveResult, cg, steihaug
from tests.conftest import dense_hessian, make_model, spectrum_matrix


def _vector(n: int, seed: int = 0, rows: int | None = None) -> torch.Tensor:
    shape = (n,) if rows is None else (rows, n)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _model_value(A: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> float:
    return float(g @ x + 0.5 * x @ A @ x)


def _exact_trust_region(A: torch.Tensor, g: torch.Tensor, radius: float) -> torch.Tensor:
    """The global minimiser of g.x + x.A.x/2 over ||x|| <= radius (Moré-Sorensen, by bisection on the shift)."""
    lam, Q = torch.linalg.eigh(A)
    c = Q.T @ g

    def step(shift):
        return -Q @ (c / (lam + shift))

    if lam[0] > 0 and step(0.0).norm() < radius:
        return step(0.0)
    low, high = max(0.0, -float(lam[0])) + 1e-15, float(lam.abs().max() + g.norm() / radius) + 1.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if step(mid).norm() > radius else (low, mid)
    return step(high)


# ----------------------------------------------------------------------------------------------- cg


def test_cg_solves_a_positive_definite_system():
    A = spectrum_matrix(torch.logspace(-2, 1, 30, dtype=torch.float64))
    b = _vector(30)
    sol = cg(A, b, max_iter=200, tol=1e-12)
    torch.testing.assert_close(sol.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12)
    assert bool(sol.converged) and not bool(sol.negative_curvature)
    assert sol.x.shape == b.shape and sol.x.dtype == torch.float64 and sol.residual.dim() == 0
    assert float(sol.residual) <= 1e-12 and 1 <= int(sol.iterations) <= 200
    assert float((b - A @ sol.x).norm() / b.norm()) == pytest.approx(float(sol.residual), abs=1e-13)  # recurrence's


def test_cg_with_damping_solves_the_shifted_system():
    A = spectrum_matrix(torch.tensor([-0.5, 0.1, 1.0, 2.0, 3.0], dtype=torch.float64))
    b = _vector(5, seed=1)
    sol = cg(A, b, damping=1.0, tol=1e-12)
    torch.testing.assert_close(sol.x, torch.linalg.solve(A + torch.eye(5), b), rtol=1e-10, atol=1e-12)
    assert bool(sol.converged)


def test_cg_on_a_damped_hessian_operator_matches_the_dense_solve():
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    dense = dense_hessian(model, F.cross_entropy, [(x, y)])
    damping = float(dense.abs().sum(1).max())  # above every eigenvalue's magnitude: H + damping I is definite
    b = _vector(H.shape[0], seed=2)
    sol = cg(H, b, damping=damping, tol=1e-11)
    want = torch.linalg.solve(dense + damping * torch.eye(H.shape[0]), b)
    torch.testing.assert_close(sol.x, want, rtol=1e-8, atol=1e-10)
    assert int(sol.iterations) == H.matvecs


def test_cg_negative_curvature_at_the_first_iteration_returns_b():
    A = -spectrum_matrix(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = _vector(3, seed=3)
    sol = cg(A, b)
    assert bool(sol.negative_curvature) and not bool(sol.converged) and int(sol.iterations) == 1
    torch.testing.assert_close(sol.x, b, rtol=0, atol=0)
    torch.testing.assert_close(sol.residual, (b - A @ b).norm() / b.norm())


def test_cg_negative_curvature_later_returns_the_last_iterate():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 0.5], dtype=torch.float64)
    alpha = float(b @ b / (b @ A @ b))  # the first step: positive curvature 0.75
    r = b - alpha * A @ b
    p = r + float(r @ r / (b @ b)) * b
    assert float(p @ A @ p) <= 0  # the second direction has negative curvature
    sol = cg(A, b)
    assert bool(sol.negative_curvature) and int(sol.iterations) == 2
    torch.testing.assert_close(sol.x, alpha * b, rtol=1e-14, atol=0)
    torch.testing.assert_close(sol.residual, r.norm() / b.norm())


def test_cg_solves_an_indefinite_system_whose_krylov_space_avoids_the_negative_eigenvector():
    # CG's conjugate directions diagonalise A on the Krylov space (Sylvester's law of inertia), so it meets
    # negative curvature exactly when that space reaches a negative eigenvector; here b is orthogonal to it
    Q, _ = torch.linalg.qr(_vector(4, seed=13, rows=4))
    A = (Q * torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64)) @ Q.T
    b = Q[:, 1:] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sol = cg(A, b, tol=1e-12)
    assert not bool(sol.negative_curvature) and bool(sol.converged) and int(sol.iterations) == 3
    torch.testing.assert_close(sol.x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


def test_cg_stops_at_max_iter_unconverged():
    A = spectrum_matrix(torch.logspace(-3, 0, 20, dtype=torch.float64))
    sol = cg(A, _vector(20), max_iter=3)
    assert int(sol.iterations) == 3 and not bool(sol.converged) and float(sol.residual) > 1e-8


def test_cg_float32_matrix_is_solved_in_float64():
    A = spectrum_matrix(torch.linspace(1.0, 4.0, 8, dtype=torch.float64))
    b = _vector(8)
    sol = cg(A.float(), b.float(), tol=1e-6)
    assert sol.x.dtype == torch.float64 and bool(sol.converged)
    torch.testing.assert_close(sol.x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ batched


def _stack_fields(results: list[SolveResult]) -> dict[str, torch.Tensor]:
    names = ("x", "residual", "iterations", "negative_curvature", "converged")
    return {name: torch.stack([getattr(r, name) for r in results]) for name in names}


def _assert_rows_equal(batched: SolveResult, results: list[SolveResult]) -> None:
    for name, want in _stack_fields(results).items():
        torch.testing.assert_close(getattr(batched, name), want, rtol=1e-12, atol=1e-14, msg=name)


def _mixed_matrices() -> torch.Tensor:
    """Rows that stop for different reasons: definite, negative definite, indefinite, ill-conditioned."""
    return torch.stack([
        spectrum_matrix(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), seed=0),
        -spectrum_matrix(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), seed=1),
        spectrum_matrix(torch.tensor([-1.0, 0.5, 2.0, 5.0], dtype=torch.float64), seed=2),
        spectrum_matrix(torch.logspace(-3, 0, 4, dtype=torch.float64), seed=3),
    ])


def test_cg_batched_rows_equal_the_per_row_solves():
    A = _mixed_matrices()
    b = _vector(4, seed=4, rows=4)
    b[3] = 0.0  # a zero right-hand side: x = 0 at once
    batched = cg(A, b, max_iter=3, damping=0.1)
    _assert_rows_equal(batched, [cg(A[i], b[i], max_iter=3, damping=0.1) for i in range(4)])
    assert batched.iterations.tolist()[1] == 1 and batched.negative_curvature.tolist()[1]
    assert batched.iterations.tolist()[3] == 0 and batched.converged.tolist()[3] and batched.x[3].abs().max() == 0


def test_cg_shared_operator_with_several_right_hand_sides():
    A = spectrum_matrix(torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=torch.float64))
    b = _vector(4, seed=5, rows=3)
    batched = cg(A, b, tol=1e-12)
    _assert_rows_equal(batched, [cg(A, row, tol=1e-12) for row in b])
    torch.testing.assert_close(batched.x, torch.linalg.solve(A, b.T).T, rtol=1e-10, atol=1e-12)


class _RowOperator:
    """A batched operator over dense (B, n, n) matrices, seen only through shape, dtype, device and @."""

    def __init__(self, A: torch.Tensor, broken: bool = False):
        self._A, self._broken = A, broken
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bij,bj->bi", self._A, X)
        return out[:, :-1] if self._broken else out


def test_batched_operator_through_matmul():
    A = _mixed_matrices()
    g = _vector(4, seed=6, rows=4)
    radius = torch.tensor([0.3, 1.0, 2.0, 50.0], dtype=torch.float64)
    _assert_rows_equal(steihaug(_RowOperator(A), g, radius), [steihaug(A[i], g[i], float(radius[i])) for i in range(4)])
    with pytest.raises(TypeError, match=r"must map \(B, n\) rows"):
        cg(_RowOperator(A, broken=True), g)


# ----------------------------------------------------------------------------------------- steihaug


def test_steihaug_interior_solution_is_the_newton_step():
    A = spectrum_matrix(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64))
    g = _vector(5, seed=7)
    newton = -torch.linalg.solve(A, g)
    sol = steihaug(A, g, radius=1.01 * float(newton.norm()), tol=1e-12)
    torch.testing.assert_close(sol.x, newton, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.x, _exact_trust_region(A, g, 1.01 * float(newton.norm())), rtol=1e-8, atol=1e-10)
    assert bool(sol.converged) and not bool(sol.negative_curvature) and float(sol.residual) <= 1e-12


def test_steihaug_is_exact_on_the_boundary_when_cg_moves_along_minus_g():
    A = 3.0 * torch.eye(6, dtype=torch.float64)  # CG's first direction is the answer: x = -radius g / ||g||
    g = _vector(6, seed=8)
    sol = steihaug(A, g, radius=0.1)
    torch.testing.assert_close(sol.x, -0.1 * g / g.norm(), rtol=1e-14, atol=0)
    torch.testing.assert_close(sol.x, _exact_trust_region(A, g, 0.1), rtol=1e-9, atol=1e-12)
    assert int(sol.iterations) == 1 and bool(sol.converged)
    torch.testing.assert_close(sol.residual, (g + A @ sol.x).norm() / g.norm())


@pytest.mark.parametrize("radius", [0.05, 0.3, 1.0])
def test_steihaug_boundary_solution_between_cauchy_and_optimal_decrease(radius):
    A = spectrum_matrix(torch.logspace(-1, 1, 12, dtype=torch.float64), seed=1)
    g = _vector(12, seed=9)
    sol = steihaug(A, g, radius=radius)
    assert float(sol.x.norm()) == pytest.approx(radius, rel=1e-12)
    cauchy_t = min(float(g @ g / (g @ A @ g)), radius / float(g.norm()))
    optimal = _model_value(A, g, _exact_trust_region(A, g, radius))
    ours = _model_value(A, g, sol.x)
    assert optimal - 1e-12 <= ours <= _model_value(A, g, -cauchy_t * g) + 1e-12
    assert ours <= 0.5 * optimal  # Yuan (2000): at least half the optimal decrease for a definite A


def test_steihaug_negative_curvature_at_the_first_iteration_goes_to_the_boundary_along_minus_g():
    A = -spectrum_matrix(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    g = _vector(3, seed=10)
    sol = steihaug(A, g, radius=0.7)
    torch.testing.assert_close(sol.x, -0.7 * g / g.norm(), rtol=1e-14, atol=0)
    assert bool(sol.negative_curvature) and bool(sol.converged) and int(sol.iterations) == 1


def test_steihaug_negative_curvature_later_stops_on_the_boundary_with_the_closed_form_tau():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    g = -torch.tensor([1.0, 0.5], dtype=torch.float64)  # the cg example above: negative curvature at step 2
    radius = 3.0
    x1 = float(g @ g / (g @ A @ g)) * -g
    r1 = g + A @ x1
    p1 = -r1 + float(r1 @ r1 / (g @ g)) * -g
    xp, pp = float(x1 @ p1), float(p1 @ p1)
    roots = [(-xp + sign * (xp**2 + pp * (radius**2 - x1 @ x1)) ** 0.5) / pp for sign in (1, -1)]
    candidates = [x1 + float(tau) * p1 for tau in roots]
    want = min(candidates, key=lambda x: _model_value(A, g, x))
    sol = steihaug(A, g, radius=radius)
    assert bool(sol.negative_curvature) and int(sol.iterations) == 2
    torch.testing.assert_close(sol.x, want, rtol=1e-12, atol=1e-14)
    assert float(sol.x.norm()) == pytest.approx(radius, rel=1e-12)
    assert _model_value(A, g, sol.x) <= _model_value(A, g, x1)


def test_steihaug_on_an_indefinite_matrix_decreases_the_model_to_the_boundary():
    A = spectrum_matrix(torch.tensor([-2.0, -0.5, 0.3, 1.0, 4.0], dtype=torch.float64), seed=4)
    g = _vector(5, seed=11)
    for radius in (0.1, 1.0, 10.0):
        sol = steihaug(A, g, radius=radius)
        assert float(sol.x.norm()) == pytest.approx(radius, rel=1e-12)  # no interior minimiser exists
        cauchy = -radius * g / g.norm() if float(g @ A @ g) <= 0 else -min(
            float(g @ g / (g @ A @ g)), radius / float(g.norm())) * g
        assert _model_value(A, g, sol.x) <= _model_value(A, g, cauchy) + 1e-12
        assert _model_value(A, g, sol.x) >= _model_value(A, g, _exact_trust_region(A, g, radius)) - 1e-12


def test_steihaug_batched_rows_with_their_own_radius_equal_the_per_row_solves():
    A = _mixed_matrices()
    g = _vector(4, seed=12, rows=4)
    g[2] = 0.0
    radius = torch.tensor([0.2, 0.5, 1.0, 100.0], dtype=torch.float64)
    batched = steihaug(A, g, radius, max_iter=4)
    _assert_rows_equal(batched, [steihaug(A[i], g[i], float(radius[i]), max_iter=4) for i in range(4)])
    assert batched.iterations[2] == 0 and batched.x[2].abs().max() == 0
    shared = steihaug(A[0], g, radius)
    _assert_rows_equal(shared, [steihaug(A[0], g[i], float(radius[i])) for i in range(4)])


def test_result_repr_is_readable():
    flat = repr(cg(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)))
    assert flat.startswith("SolveResult(x=[1, 1]") and "negative_curvature=False, converged=True" in flat
    rows = repr(steihaug(_mixed_matrices(), _vector(4, rows=4), 0.5))
    assert "negative_curvature=1/4" in rows and "converged=4/4" in rows


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused():
    A = spectrum_matrix(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    b = _vector(3)
    with pytest.raises(TypeError, match="square"):
        cg(torch.ones(3, 4, dtype=torch.float64), b)
    with pytest.raises(TypeError, match=r"shape \(B, n, n\)"):
        steihaug(torch.ones(2, 3, 4, dtype=torch.float64), b, 1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(B, 3\)"):
        cg(A, _vector(4))
    with pytest.raises(ValueError, match=r"one row per system"):
        cg(A[None].expand(2, 3, 3), _vector(3, rows=3))
    with pytest.raises(TypeError, match="floating-point"):
        cg(A, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="nan or inf"):
        steihaug(A, torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), 1.0)
    for radius in (0.0, -1.0, float("inf"), torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="radius must be positive"):
            steihaug(A, b if not isinstance(radius, torch.Tensor) else _vector(3, rows=2), radius)
    with pytest.raises(ValueError, match=r"one per row"):
        steihaug(A, _vector(3, rows=2), torch.ones(3))
    with pytest.raises(TypeError, match="radius must be a number"):
        steihaug(A, b, "1")
    for max_iter in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_iter must be a positive integer"):
            cg(A, b, max_iter=max_iter)
    with pytest.raises(ValueError, match="tol"):
        steihaug(A, b, 1.0, tol=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        cg(A, b, damping=float("nan"))
