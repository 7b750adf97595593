r"""Uniform symmetric per-channel weight quantization and HAWQ-v3 mixed precision by integer programming.

Q_b(W): per output channel c, scale_c = max|w_c| / (2^(b-1) - 1), round to nearest, clamp to
[-(2^(b-1) - 1), 2^(b-1) - 1] (torch.fake_quantize_per_channel_affine). The HAWQ-v3 objective for
choosing bits b_i per layer is sum_i Omega_{i, b_i} with Omega_{i,b} = tr(H_ii)/n_i ||Q_b(W_i) - W_i||^2;
with one-hot x_{i,b} it is a linear program in integers, solved exactly by scipy.optimize.milp under
budgets on total weight bits and on BOPs (sum_i MACs_i b_i b_act), and ties (equal bits in a group).
"Exactly" at any scale of the table (mean eigenvalues of 1e-9 or 1e9, of either sign): the solver
sees a normalised program whose coefficients are of the order of the optimal objective itself
(see ``_optimal_choice``), and the assignment's budgets are verified in exact arithmetic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from .sensitivity import weight_layers


def _check_bits(bits: Any) -> tuple[int, ...]:
    values = tuple(bits)
    if not values or any(not isinstance(b, (int, np.integer)) or not 2 <= b <= 16 for b in values):
        raise ValueError(f"bits must be integers between 2 and 16 (a symmetric grid needs 2^(b-1) - 1 >= 1), "
                         f"got {bits!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"bits must not repeat, got {bits!r}")
    return tuple(sorted(int(b) for b in values))


def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_b(W): symmetric uniform fake quantization per output channel (dim 0)."""
    (bits,) = _check_bits([bits])
    levels = 2 ** (bits - 1) - 1
    w = weight.detach()
    scale = w.abs().reshape(w.shape[0], -1).amax(1).double() / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.to(w.device), zero, 0, -levels, levels)


def perturbation(model: nn.Module, bits: Any = (2, 4, 8)) -> pd.DataFrame:
    """||Q_b(W_i) - W_i||^2 for every Linear/Conv layer (rows, by module name) and bit width (columns)."""
    bits = _check_bits(bits)
    layers, _ = weight_layers(model)
    rows = {name: [float((quantize_weight(m.weight, b) - m.weight.detach()).double().square().sum()) for b in bits]
            for name, m in layers.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(bits))


def quantize(model: nn.Module, bits: dict[str, int]) -> nn.Module:
    """A copy of ``model`` whose listed layers have fake-quantized weights; the original is untouched.

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> qmodel = quantize(model, {"0": 4, "2": 8})
    >>> max(len(row.unique()) for row in qmodel[0].weight.detach()) <= 2 ** 4      # 4-bit rows
    True
    """
    layers, _ = weight_layers(model)
    unknown = set(bits) - set(layers)
    if unknown:
        raise ValueError(f"bits names layers that are not Linear/Conv modules of the model: {sorted(unknown)}")
    qmodel = copy.deepcopy(model)
    modules = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, b in bits.items():
            modules[name].weight.copy_(quantize_weight(modules[name].weight, b))
    return qmodel


@dataclass(repr=False)
class MixedPrecision:
    """An exact HAWQ-v3 assignment: ``bits`` per layer, its objective, weight bits and BOPs."""

    bits: dict[str, int]
    objective: float
    weight_bits: int
    bops: float
    frontier: pd.DataFrame | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __repr__(self) -> str:
        avg = self.weight_bits / max(int(self.table["n_params"].sum()), 1) if len(self.table) else float("nan")
        return (f"MixedPrecision(bits={self.bits}, objective={self.objective:.4g}, weight_bits={self.weight_bits} "
                f"(avg {avg:.2f}/weight), bops={self.bops:.4g})")

    def plot_frontier(self, ax=None):
        """The objective against the weight-size budget along the Pareto frontier; returns the Figure."""
        import matplotlib.pyplot as plt

        if self.frontier is None:
            raise ValueError("no frontier was computed: call mixed_precision(..., frontier=N)")
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.frontier["avg_bits"], self.frontier["objective"], "o-")
        ax.set(xlabel="average bits per weight", ylabel="HAWQ objective  sum tr(H)/n ||Q(W)-W||^2", yscale="log",
               title="Mixed-precision Pareto frontier (exact ILP per budget)")
        ax.grid(alpha=0.3)
        return ax.figure


class _Program(NamedTuple):
    """The HAWQ-v3 integer program: Omega (layers x bits), sizes, MACs, bit widths, tied layer groups."""

    omega: np.ndarray
    n: np.ndarray
    macs: np.ndarray
    bits: tuple[int, ...]
    ties: list[list[int]]
    activation_bits: int

    def loads(self, choice: np.ndarray) -> tuple[int, float]:
        """Total weight bits and BOPs of an assignment (a bit-width index per layer)."""
        chosen = np.array(self.bits)[choice]
        return int((self.n * chosen).sum()), float((self.macs * chosen * self.activation_bits).sum())


def _solve(program: _Program, cost: np.ndarray, allowed: np.ndarray, max_weight_bits: float | None,
           max_bops: float | None) -> np.ndarray | None:
    """The optimal one-hot assignment among the ``allowed`` options (layers x bits), None when infeasible.

    The objective is divided by its largest allowed coefficient and each budget row by its budget, so
    scipy.optimize.milp (HiGHS) sees coefficients of order one whatever the scale of the table.
    """
    L, B = cost.shape
    b = np.array(program.bits, dtype=float)
    constraints = [LinearConstraint(np.kron(np.eye(L), np.ones(B)), 1, 1)]
    for per_bit, budget in ((program.n, max_weight_bits), (program.macs * program.activation_bits, max_bops)):
        if budget is not None:
            constraints.append(LinearConstraint((per_bit[:, None] * b[None, :]).ravel()[None, :] / budget, -np.inf, 1))
    for group in program.ties:
        for i, j in zip(group[:-1], group[1:]):
            rows = np.zeros((B, L * B))
            rows[np.arange(B), i * B + np.arange(B)] = 1
            rows[np.arange(B), j * B + np.arange(B)] = -1
            constraints.append(LinearConstraint(rows, 0, 0))
    scale = np.abs(cost[allowed]).max()
    res = milp((cost / scale if scale > 0 else cost).ravel(), constraints=constraints, integrality=np.ones(L * B),
               bounds=Bounds(0, allowed.ravel().astype(float)), options={"mip_rel_gap": 0})
    if res.status == 2:  # infeasible
        return None
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"the mixed-precision integer program did not solve: {res.message}")
    return np.round(res.x).reshape(L, B).argmax(1)


def _optimal_choice(program: _Program, max_weight_bits: float | None, max_bops: float | None) -> np.ndarray | None:
    r"""The assignment minimising sum_i Omega_{i, b_i} under the budgets and ties (None if infeasible), at any scale.

    A solver's tolerances are absolute, so on its own it cannot tell apart assignments whose objectives
    differ by less than about 1e-7 of the largest coefficient. The objective is therefore posed as the
    regret R = sum_i (Omega_{i,b_i} - min_b Omega_{i,b}) >= 0 (the same minimiser) and solved; an option
    whose own regret exceeds the R just found cannot be in a better assignment, so it is excluded and the
    program re-solved, re-normalised by the largest remaining coefficient, until no option is excluded:
    the final coefficients are of the order of the optimal regret itself.
    """
    regret = program.omega - program.omega.min(1, keepdims=True)
    allowed = np.ones(regret.shape, dtype=bool)
    while True:
        choice = _solve(program, regret, allowed, max_weight_bits, max_bops)
        if choice is None:
            return None
        keep = regret <= regret[np.arange(len(choice)), choice].sum()
        if (keep == allowed).all():
            break
        allowed = keep
    weight_bits, bops = program.loads(choice)
    for name, load, budget in (("max_weight_bits", weight_bits, max_weight_bits), ("max_bops", bops, max_bops)):
        if budget is not None and load > budget:
            raise RuntimeError(f"the integer program's assignment exceeds {name}={budget:.6g} by {load - budget:.6g} "
                               f"(solver tolerance); pass a budget smaller by that much")
    return choice


def mixed_precision(model: nn.Module, sens: pd.DataFrame, bits: Any = (2, 4, 8), max_weight_bits: float | None = None,
                    max_bops: float | None = None, ties: list[list[str]] | None = None, *, activation_bits: int = 8,
                    frontier: int = 0) -> MixedPrecision:
    r"""Per-layer bit widths minimising sum_i tr(H_ii)/n_i ||Q_b(W_i) - W_i||^2, exactly (integer program).

    ``sens`` is :func:`sensitivity` at layer granularity (needs ``module``, ``n_params``, ``mean_eig``, and
    ``macs`` for a BOPs budget). ``max_weight_bits``: total bits of all quantized weights; ``max_bops``:
    sum_i MACs_i b_i ``activation_bits``; ``ties``: groups of module names that must share bits (e.g.
    layers feeding one residual add). ``frontier=N`` also solves N budgets from all-lowest to
    all-highest bits and returns the Pareto frontier (``res.frontier``, ``res.plot_frontier()``).

    >>> from curvkit.compress import sensitivity
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> sens = sensitivity(model, F.cross_entropy, (x, y), seed=0, progress=False)
    >>> res = mixed_precision(model, sens, bits=(2, 4, 8), max_weight_bits=4 * sens.n_params.sum())
    >>> qmodel = quantize(model, res.bits)
    >>> sorted(res.bits.values())[0] in (2, 4, 8)
    True
    """
    bits = _check_bits(bits)
    required = {"module", "n_params", "mean_eig"}
    if not required <= set(sens.columns) or "channel" in sens.columns:
        raise ValueError(f"sens must be a layer-granularity sensitivity() table with columns {sorted(required)}")
    for name, value in (("max_weight_bits", max_weight_bits), ("max_bops", max_bops)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if max_bops is not None and "macs" not in sens.columns:
        raise ValueError("a BOPs budget needs the 'macs' column of sensitivity(granularity='layer')")
    names = list(sens["module"])
    program = _program(model, sens, names, bits, ties or [], activation_bits)
    choice = _optimal_choice(program, max_weight_bits, max_bops)
    if choice is None:
        lowest = float(program.n.sum() * bits[0])
        raise ValueError(
            f"no assignment of bits {bits} meets the budgets (max_weight_bits={max_weight_bits}, max_bops={max_bops}"
            f"{', with ties' if ties else ''}); the smallest possible weight size is {lowest:.0f} bits "
            f"and BOPs {float((program.macs * bits[0] * activation_bits).sum()):.4g}"
        )
    result = _assignment(names, program, choice)
    if frontier:
        result.frontier = _frontier(names, program, frontier, max_bops)
    return result


def _program(model: nn.Module, sens: pd.DataFrame, names: list[str], bits: tuple[int, ...], ties: list[list[str]],
             activation_bits: int) -> _Program:
    """The integer program of a sensitivity table: Omega_{i,b} = mean_eig_i ||Q_b(W_i) - W_i||^2, sizes, ties."""
    pert = perturbation(model, bits).loc[names]
    omega = sens["mean_eig"].to_numpy()[:, None] * pert.to_numpy()
    macs = sens["macs"].to_numpy(dtype=float) if "macs" in sens.columns else np.zeros(len(names))
    index = {m: i for i, m in enumerate(names)}
    tie_idx = []
    for group in ties:
        unknown = [m for m in group if m not in index]
        if unknown:
            raise ValueError(f"ties name modules that are not in sens: {unknown}")
        tie_idx.append([index[m] for m in group])
    return _Program(omega, sens["n_params"].to_numpy(dtype=float), macs, bits, tie_idx, activation_bits)


def _frontier(names: list[str], program: _Program, points: int, max_bops: float | None) -> pd.DataFrame:
    """The optimal assignment for ``points`` weight budgets from all-lowest to all-highest bits (feasible ones)."""
    total = program.n.sum()
    rows = []
    for budget in np.linspace(total * program.bits[0], total * program.bits[-1], points):
        choice = _optimal_choice(program, budget, max_bops)
        if choice is not None:
            r = _assignment(names, program, choice)
            rows.append({"budget": budget, "weight_bits": r.weight_bits, "avg_bits": r.weight_bits / total,
                         "objective": r.objective, "bops": r.bops, "bits": r.bits})
    return pd.DataFrame(rows)


def _assignment(names: list[str], program: _Program, choice: np.ndarray) -> MixedPrecision:
    """The MixedPrecision record of an assignment (a bit-width index per layer)."""
    chosen = np.array(program.bits)[choice]
    table = pd.DataFrame({"module": names, "n_params": program.n.astype(int), "bits": chosen,
                          "omega": program.omega[np.arange(len(names)), choice]})
    weight_bits, bops = program.loads(choice)
    return MixedPrecision(bits=dict(zip(names, chosen.tolist())), objective=float(table["omega"].sum()),
                          weight_bits=weight_bits, bops=bops, table=table)
