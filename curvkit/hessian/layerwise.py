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
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._progress import progress_bar
from ._random import Seed, gaussian, make_generator, rademacher
from .eigen import _error_bounds
from .lanczos import SegmentedLanczos, apply
from .operator import HessianOperator

STATS = ("trace", "top_eig", "mean_eig")
PILOT = 10
_CHANNEL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
By = Union[str, "re.Pattern[str]"]


def _groups(model: nn.Module, H: HessianOperator, by: By) -> tuple[list[dict], torch.Tensor]:
    """Row labels and the group index of every coordinate of ``H`` (-1: in no group)."""
    offsets = dict(zip(H.param_names, np.cumsum([0, *H._sizes[:-1]]).tolist()))
    ids = torch.full((H.shape[0],), -1, dtype=torch.long)
    labels: list[dict] = []

    def add(label: dict, spans: list[tuple[int, int]]) -> None:
        for start, stop in spans:
            ids[start:stop] = len(labels)
        labels.append(label)

    def span(name: str, numel: int | None = None) -> tuple[int, int]:
        start = offsets[name]
        return start, start + (numel if numel is not None else H._sizes[H.param_names.index(name)])

    if by == "module":
        for mod_name, module in model.named_modules():
            names = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
            names = [n for n in names if n in offsets]
            if names:
                add({"module": mod_name}, [span(n) for n in names])
    elif by == "parameter":
        for name in H.param_names:
            add({"parameter": name}, [span(name)])
    elif by == "channel":
        for mod_name, module in model.named_modules():
            if not isinstance(module, _CHANNEL_MODULES):
                continue
            weight, bias = (f"{mod_name}.{n}" if mod_name else n for n in ("weight", "bias"))
            if weight not in offsets:
                continue
            out_channels, per_channel = module.weight.shape[0], module.weight[0].numel()
            for c in range(out_channels):
                spans = [(offsets[weight] + c * per_channel, offsets[weight] + (c + 1) * per_channel)]
                if bias in offsets:
                    spans.append((offsets[bias] + c, offsets[bias] + c + 1))
                add({"module": mod_name, "channel": c}, spans)
    else:
        pattern = re.compile(by) if isinstance(by, str) else by
        keys: dict[str, list] = {}
        for name in H.param_names:
            match = pattern.search(name)
            if match:
                keys.setdefault(match.group(0), []).append(span(name))
        for key, spans in keys.items():
            add({"group": key}, spans)
    if not labels:
        raise ValueError(f"by={by!r} forms no group from the parameters {H.param_names[:5]}...; "
                         "use 'module', 'parameter', 'channel' or a regex that matches parameter names")
    return labels, ids


def _block_traces(H: Any, ids: torch.Tensor, n_groups: int, rtol: float, budget: int, gen: torch.Generator,
                  progress: bool | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hutchinson traces of all diagonal blocks from shared probes, until every block reaches ``rtol``."""
    n = H.shape[0]
    valid = ids >= 0
    index = ids[valid].to(H.device)
    total = torch.zeros(n_groups, dtype=torch.float64, device=H.device)
    total_sq = torch.zeros_like(total)
    used, block = 0, PILOT
    with progress_bar(total=budget, desc="block traces", enable=progress) as bar:
        while used < budget:
            k = min(block, budget - used)
            Z = rademacher(n, k, gen, H.device)
            samples = (Z * apply(H, Z))[valid.to(H.device)]
            per_group = samples.new_zeros(n_groups, k).index_add_(0, index, samples)
            total += per_group.sum(1)
            total_sq += per_group.square().sum(1)
            used += k
            bar.update(k)
            mean = total / used
            stderr = ((total_sq - used * mean.square()).clamp_min(0) / max(used - 1, 1) / used).sqrt()
            if used >= PILOT and bool((stderr <= rtol * mean.abs()).all()):
                break
            if not H.single_batch:
                block = min(2 * block, H.max_block)
    return mean.cpu(), stderr.cpu(), used


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
                out[:, j] += (apply(self.H, masks * V[:, j:j + 1]) * masks).sum(1)
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
                top[g], bounds[g] = theta[-1], _error_bounds(theta, resid)[-1]
            if np.all(bounds <= tol * np.maximum(np.abs(top), 1e-12)):
                break
    return top, bounds


def layerwise(model: nn.Module, loss_fn: Any, data: Any, stats: tuple[str, ...] | None = None, by: By = "module",
              seed: Seed = 0, *, rtol: float = 0.05, max_matvecs: int | None = None, eig_tol: float = 1e-3,
              eig_steps: int = 50, progress: bool | None = None, **operator_kwargs: Any) -> pd.DataFrame:
    r"""Curvature statistics of every diagonal block of the Hessian, one row per group.

    ``by``: ``"module"`` (each module that owns parameters, in ``named_modules`` order),
    ``"parameter"``, ``"channel"`` (every output channel c of Linear/Conv weights: weight[c] and
    bias[c]), or a regex whose match in the parameter name is the group key. ``stats`` (default
    ``("trace", "top_eig")``, ``("trace",)`` for channels) from ``"trace"`` (with ``trace_stderr``;
    shared probes until every block's relative standard error is below ``rtol`` or
    ``max_matvecs`` products), ``"top_eig"`` (Lanczos on each block H_gg, relative error bound
    ``eig_tol``) and ``"mean_eig"`` (trace / n_params). Extra keyword arguments go to
    :class:`HessianOperator` (``params``, ``forward``, ``bn_mode``, ``max_block``, ``distributed``).

    >>> df = layerwise(model, F.cross_entropy, (x, y), seed=0)
    >>> df[["module", "n_params", "trace", "trace_stderr", "top_eig"]]
    """
    channel = by == "channel"
    stats = (("trace",) if channel else ("trace", "top_eig")) if stats is None else tuple(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"stats must be a non-empty subset of {STATS}, got {stats!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    H = HessianOperator(model, loss_fn, data, **operator_kwargs)
    labels, ids = _groups(model, H, by)
    G = len(labels)
    df = pd.DataFrame(labels)
    df["n_params"] = torch.bincount(ids[ids >= 0], minlength=G).numpy()
    gen = make_generator(seed, shared=H.distributed)
    if "trace" in stats or "mean_eig" in stats:
        budget = 500 if max_matvecs is None else int(max_matvecs)
        if budget < 2:
            raise ValueError(f"max_matvecs={max_matvecs} is too small: a standard error needs at least 2 products")
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
