r"""Per-layer, per-parameter and per-channel curvature statistics from shared products.

Every coordinate belongs to at most one group g (a module, a parameter, a regex match, or an
output channel: weight[c] and bias[c]). Traces of all diagonal blocks come from the same full
products: for a Rademacher probe z, z_g^T (H z)_g = z_g^T H_gg z_g + sum_{h != g} z_g^T H_gh z_h
has expectation tr(H_gg) (the cross terms have mean zero), so one product per probe serves every
group. Top eigenvalues of the blocks H_gg run one Lanczos recurrence per group in lock-step.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._utils.layers import WEIGHT_LAYERS, qualified
from .._utils.progress import progress_bar
from .._utils.random import Seed, gaussian, make_generator
from .._utils.stats import RunningMoments
from ._probing import PILOT, check_budget, hutchinson_samples
from .eigen import error_bounds
from .factory import OperatorSpec, build_operator
from .lanczos import SegmentedLanczos
from .operator import matmat_float64

STATS = ("trace", "top_eig", "mean_eig")
By = Union[str, "re.Pattern[str]"]


Groups = tuple[list[dict], torch.Tensor]


class _Grouping:
    """Collects groups: a row label each, and the group index of every coordinate (-1: in no group)."""

    def __init__(self, H: Any):
        self.H = H
        self.offsets = dict(zip(H.param_names, H.offsets))
        self.ids = torch.full((H.shape[0],), -1, dtype=torch.long)
        self.labels: list[dict] = []

    def span(self, name: str) -> tuple[int, int]:
        """The coordinates of parameter ``name``."""
        start = self.offsets[name]
        return start, start + self.H.sizes[self.H.param_names.index(name)]

    def add(self, label: dict, spans: list[tuple[int, int]]) -> None:
        for start, stop in spans:
            self.ids[start:stop] = len(self.labels)
        self.labels.append(label)


def _by_module(model: nn.Module, g: _Grouping) -> None:
    for mod_name, module in model.named_modules():
        names = [qualified(mod_name, n) for n, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if n in g.offsets]
        if names:
            g.add({"module": mod_name}, [g.span(n) for n in names])


def _by_parameter(model: nn.Module, g: _Grouping) -> None:
    for name in g.H.param_names:
        g.add({"parameter": name}, [g.span(name)])


def _by_channel(model: nn.Module, g: _Grouping) -> None:
    for mod_name, module in model.named_modules():
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        for c, spans in enumerate(channel_spans(g.offsets, mod_name, module)):
            g.add({"module": mod_name, "channel": c}, spans)


def channel_spans(offsets: dict[str, int], mod_name: str, module: nn.Module) -> list[list[tuple[int, int]]]:
    """The coordinates of every output channel c of a weight layer: weight[c] and, if selected, bias[c].

    Args:
        offsets: where each selected parameter starts in a flat vector, by full name.
        mod_name: the layer's name in the model.
        module: the Linear/Conv layer.

    Returns:
        A list of spans ``[(start, stop), ...]`` per channel; empty when the weight is not selected.
    """
    weight, bias = qualified(mod_name, "weight"), qualified(mod_name, "bias")
    if weight not in offsets:
        return []
    per_channel = module.weight[0].numel()
    channels = []
    for c in range(module.weight.shape[0]):
        spans = [(offsets[weight] + c * per_channel, offsets[weight] + (c + 1) * per_channel)]
        if bias in offsets:
            spans.append((offsets[bias] + c, offsets[bias] + c + 1))
        channels.append(spans)
    return channels


def _by_pattern(pattern: re.Pattern[str]) -> Callable[[nn.Module, _Grouping], None]:
    def group(model: nn.Module, g: _Grouping) -> None:
        keys: dict[str, list] = {}
        for name in g.H.param_names:
            match = pattern.search(name)
            if match:
                keys.setdefault(match.group(0), []).append(g.span(name))
        for key, spans in keys.items():
            g.add({"group": key}, spans)
    return group


GROUPINGS: dict[str, Callable[[nn.Module, _Grouping], None]] = {
    "module": _by_module, "parameter": _by_parameter, "channel": _by_channel,
}


def _groups(model: nn.Module, H: Any, by: By) -> Groups:
    """Row labels and the group index of every coordinate of ``H`` (-1: in no group)."""
    grouping = _Grouping(H)
    group = GROUPINGS.get(by) if isinstance(by, str) else None
    if group is None:
        group = _by_pattern(re.compile(by) if isinstance(by, str) else by)
    group(model, grouping)
    if not grouping.labels:
        raise ValueError(f"by={by!r} forms no group from the parameters {H.param_names[:5]}...; "
                         f"use one of {tuple(GROUPINGS)} or a regex that matches parameter names")
    return grouping.labels, grouping.ids


def _block_traces(H: Any, ids: torch.Tensor, n_groups: int, rtol: float, budget: int, gen: torch.Generator,
                  progress: bool | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hutchinson traces of all diagonal blocks from the same probes, until every block reaches ``rtol``.

    On an operator over several batches (or ranks) the probes are stratified, each batch its own
    (:meth:`~curvkit.hessian.model.ModelOperator.stratified_samples`).
    """
    valid = (ids >= 0).to(H.device)
    index = ids[ids >= 0].to(H.device)
    moments = RunningMoments(n_groups, device=H.device)
    block = PILOT
    with progress_bar(total=budget, desc="block traces", enable=progress) as bar:
        while moments.count < budget:
            k = min(block, budget - moments.count)
            samples = hutchinson_samples(H, k, gen)[valid]
            moments.add(samples.new_zeros(n_groups, k).index_add_(0, index, samples))
            bar.update(k)
            if moments.count >= PILOT and bool((moments.stderr <= rtol * moments.mean.abs()).all()):
                break
            if not getattr(H, "single_batch", True):
                block = min(2 * block, getattr(H, "max_block", block))
    return moments.mean.cpu(), moments.stderr.cpu(), moments.count


class _BlockDiagonal:
    """The block-diagonal part of ``H`` for a partition of coordinates (blocks chunked by ``max_block``)."""

    def __init__(self, H: Any, ids: torch.Tensor, n_groups: int):
        self.H, self.shape, self.dtype, self.device = H, H.shape, H.dtype, H.device
        self._ids = ids.to(H.device)
        self._chunk = getattr(H, "max_block", 16)
        self._groups = n_groups

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        if V.dim() == 1:
            return (self @ V[:, None])[:, 0]
        out = torch.zeros_like(V, dtype=torch.float64)
        for j in range(V.shape[1]):
            for start in range(0, self._groups, self._chunk):
                groups = torch.arange(start, min(start + self._chunk, self._groups), device=V.device)
                masks = (self._ids[:, None] == groups[None, :]).to(torch.float64)
                out[:, j] += (matmat_float64(self.H, masks * V[:, j:j + 1]) * masks).sum(1)
        return out


def _block_top_eigenvalues(H: Any, ids: torch.Tensor, n_groups: int, tol: float, max_steps: int,
                           gen: torch.Generator, progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenvalue of every diagonal block by lock-step Lanczos; returns values and error bounds."""
    lanczos = SegmentedLanczos(_BlockDiagonal(H, ids, n_groups), gaussian(H.shape[0], 1, gen, H.device)[:, 0],
                               ids, max_steps)
    top = np.zeros(n_groups)
    bounds = np.full(n_groups, np.inf)
    with progress_bar(total=lanczos.max_steps, desc="block eigenvalues", enable=progress) as bar:
        while not lanczos.done:
            lanczos.step()
            bar.update(1)
            for g in range(n_groups):
                theta, _, resid = lanczos.ritz(g)
                top[g], bounds[g] = theta[-1], error_bounds(theta, resid)[-1]
            if np.all(bounds <= tol * np.maximum(np.abs(top), 1e-12)):
                break
    return top, bounds


def layerwise(model: nn.Module, loss_fn: Any, data: Any, stats: tuple[str, ...] | None = None, by: By = "module",
              seed: Seed = 0, *, rtol: float = 0.05, max_matvecs: int | None = None, eig_tol: float = 1e-3,
              eig_steps: int = 50, progress: bool | None = None, operator: OperatorSpec = "hessian",
              **operator_kwargs: Any) -> pd.DataFrame:
    r"""Curvature statistics of every diagonal block of the Hessian (or GGN), one row per group.

    Traces of all blocks come from shared full products (:math:`E[z_g^\top (Hz)_g] = \mathrm{tr}\,H_{gg}`),
    top eigenvalues from one lock-step Lanczos recurrence per block.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> df = layerwise(model, F.cross_entropy, (x, y), seed=0)
    >>> df.columns.tolist()
    ['module', 'n_params', 'trace', 'trace_stderr', 'top_eig']

    Args:
        model: the model (borrowed, never mutated).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: one batch or a re-iterable of batches.
        stats: from ``"trace"`` (with ``trace_stderr``; shared probes until every block's relative standard
            error is below ``rtol`` or ``max_matvecs`` products), ``"top_eig"`` (Lanczos on each block
            :math:`H_{gg}`, relative error bound ``eig_tol``) and ``"mean_eig"`` (trace / n_params); default
            ``("trace", "top_eig")``, ``("trace",)`` for channels.
        by: ``"module"`` (each module that owns parameters, in ``named_modules`` order), ``"parameter"``,
            ``"channel"`` (every output channel c of Linear/Conv weights: weight[c] and bias[c]), or a regex
            whose match in the parameter name is the group key.
        seed: an int, a ``torch.Generator`` or None for the probes.
        rtol: the relative standard error every block trace should reach.
        max_matvecs: the trace's product budget (default 500).
        eig_tol: the relative error bound of the block eigenvalues.
        eig_steps: the most Lanczos steps for the block eigenvalues.
        progress: show progress bars (None: when stderr is a terminal).
        operator: ``"hessian"``, ``"ggn"`` or a factory ``operator(model, loss_fn, data, **kwargs)``.
        **operator_kwargs: passed to the operator (``params``, ``forward``, ``bn_mode``, ``max_block``,
            ``distributed``).

    Returns:
        A DataFrame with the group labels, ``n_params`` and the requested statistics; ``df.attrs["matvecs"]``
        counts the products.

    Raises:
        ValueError: unknown stats, a non-positive ``rtol``, ``max_matvecs`` below 2, or groups that match nothing.
    """
    channel = by == "channel"
    stats = (("trace",) if channel else ("trace", "top_eig")) if stats is None else tuple(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"stats must be a non-empty subset of {STATS}, got {stats!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    H = build_operator(operator, model, loss_fn, data, **operator_kwargs)
    labels, ids = _groups(model, H, by)
    G = len(labels)
    df = pd.DataFrame(labels)
    df["n_params"] = torch.bincount(ids[ids >= 0], minlength=G).numpy()
    gen = make_generator(seed, shared=getattr(H, "distributed", False))
    if "trace" in stats or "mean_eig" in stats:
        budget = check_budget(max_matvecs, 500)
        mean, stderr, used = _block_traces(H, ids, G, rtol, budget, gen, progress)
        if "trace" in stats:
            df["trace"], df["trace_stderr"] = mean.numpy(), stderr.numpy()
        if "mean_eig" in stats:
            df["mean_eig"] = mean.numpy() / df["n_params"].to_numpy()
        reached = stderr <= rtol * mean.abs()
        if not bool(reached.all()):
            warnings.warn(f"layerwise: {int((~reached).sum())} of {G} block traces did not reach rtol={rtol} within "
                          f"{used} products (see trace_stderr); raise max_matvecs", RuntimeWarning, stacklevel=2)
    if "top_eig" in stats:
        top, bounds = _block_top_eigenvalues(H, ids, G, eig_tol, eig_steps, gen, progress)
        df["top_eig"] = top
        if not np.all(bounds <= eig_tol * np.maximum(np.abs(top), 1e-12)):
            warnings.warn(f"layerwise: some block eigenvalues did not reach eig_tol={eig_tol} in {eig_steps} steps "
                          f"(largest error bound {np.max(bounds):.3g}); raise eig_steps", RuntimeWarning, stacklevel=2)
    df.attrs["matvecs"] = H.matvecs
    return df
