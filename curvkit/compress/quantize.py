r"""Uniform symmetric per-channel weight quantization and HAWQ-v3 mixed precision by integer programming.

Q_b(W): per output channel c, scale_c = max|w_c| / (2^(b-1) - 1), round to nearest, clamp to
[-(2^(b-1) - 1), 2^(b-1) - 1] (torch.fake_quantize_per_channel_affine). The HAWQ-v3 objective for
choosing bits b_i per layer is sum_i Omega_{i, b_i} with Omega_{i,b} = tr(H_ii)/n_i ||Q_b(W_i) - W_i||^2;
with one-hot x_{i,b} it is a linear program in integers, solved exactly by scipy.optimize.milp under
budgets on total weight bits and on BOPs (sum_i MACs_i b_i b_act), and ties (equal bits in a group).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

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

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> qmodel = quantize(model, {"0": 4, "2": 8})
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


def _solve(omega: np.ndarray, n: np.ndarray, macs: np.ndarray, bits: tuple[int, ...], max_weight_bits, max_bops,
           ties: list[list[int]], activation_bits: int) -> np.ndarray | None:
    """Optimal one-hot assignment (layers x bits) or None when infeasible."""
    L, B = omega.shape
    b = np.array(bits, dtype=float)
    constraints = [LinearConstraint(np.kron(np.eye(L), np.ones(B)), 1, 1)]
    if max_weight_bits is not None:
        constraints.append(LinearConstraint((n[:, None] * b[None, :]).ravel()[None, :], -np.inf, max_weight_bits))
    if max_bops is not None:
        constraints.append(LinearConstraint((macs[:, None] * b[None, :] * activation_bits).ravel()[None, :],
                                            -np.inf, max_bops))
    for group in ties:
        for i, j in zip(group[:-1], group[1:]):
            rows = np.zeros((B, L * B))
            rows[np.arange(B), i * B + np.arange(B)] = 1
            rows[np.arange(B), j * B + np.arange(B)] = -1
            constraints.append(LinearConstraint(rows, 0, 0))
    res = milp(omega.ravel(), constraints=constraints, integrality=np.ones(L * B), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        return None
    return np.round(res.x).reshape(L, B).argmax(1)


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
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> sens = sensitivity(model, F.cross_entropy, (x, y), seed=0)
    >>> res = mixed_precision(model, sens, bits=(2, 4, 8), max_weight_bits=4 * sens.n_params.sum())
    >>> qmodel = quantize(model, res.bits)
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
    pert = perturbation(model, bits).loc[names]
    omega = sens["mean_eig"].to_numpy()[:, None] * pert.to_numpy()
    n = sens["n_params"].to_numpy(dtype=float)
    macs = sens["macs"].to_numpy(dtype=float) if "macs" in sens.columns else np.zeros(len(names))
    index = {m: i for i, m in enumerate(names)}
    tie_idx = []
    for group in ties or []:
        unknown = [m for m in group if m not in index]
        if unknown:
            raise ValueError(f"ties name modules that are not in sens: {unknown}")
        tie_idx.append([index[m] for m in group])

    def solve(weight_budget):
        return _solve(omega, n, macs, bits, weight_budget, max_bops, tie_idx, activation_bits)

    choice = solve(max_weight_bits)
    if choice is None:
        lowest = float(n.sum() * bits[0])
        raise ValueError(
            f"no assignment of bits {bits} meets the budgets (max_weight_bits={max_weight_bits}, max_bops={max_bops}"
            f"{', with ties' if ties else ''}); the smallest possible weight size is {lowest:.0f} bits "
            f"and BOPs {float((macs * bits[0] * activation_bits).sum()):.4g}"
        )
    result = _result(names, omega, n, macs, bits, choice, activation_bits)
    if frontier:
        budgets = np.linspace(n.sum() * bits[0], n.sum() * bits[-1], frontier)
        rows = []
        for budget in budgets:
            c = solve(budget)
            if c is not None:
                r = _result(names, omega, n, macs, bits, c, activation_bits)
                rows.append({"budget": budget, "weight_bits": r.weight_bits, "avg_bits": r.weight_bits / n.sum(),
                             "objective": r.objective, "bops": r.bops, "bits": r.bits})
        result.frontier = pd.DataFrame(rows)
    return result


def _result(names, omega, n, macs, bits, choice, activation_bits) -> MixedPrecision:
    chosen = np.array([bits[j] for j in choice])
    table = pd.DataFrame({"module": names, "n_params": n.astype(int), "bits": chosen,
                          "omega": omega[np.arange(len(names)), choice]})
    return MixedPrecision(
        bits=dict(zip(names, chosen.tolist())),
        objective=float(table["omega"].sum()),
        weight_bits=int((n * chosen).sum()),
        bops=float((macs * chosen * activation_bits).sum()),
        table=table,
    )
