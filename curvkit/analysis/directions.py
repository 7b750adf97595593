r"""Directions in parameter space for loss landscapes.

Random (filter-normalised), Hessian eigenvectors, or towards another set of weights. A direction is a
dict ``name -> tensor`` shaped like the parameters.

Filter normalisation (Li et al. 2018): for a Gaussian direction d and each output filter f (row of a
Linear weight, output channel of a Conv weight), d_f <- d_f ||theta_f|| / (||d_f|| + 1e-10), so a
step of 1 along d moves every filter by its own norm; 1-D parameters (biases, BatchNorm) are zeroed
with ``ignore="biasbn"`` or, if kept, set to the parameter itself (as in Li et al.'s code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._utils.random import Seed, make_generator
from ..hessian import build_operator, eigenvalues
from ..hessian.factory import OperatorSpec

Direction = dict[str, torch.Tensor]
NORMS = ("filter", "layer", None)
IGNORES = ("biasbn", None)


def _normalise(d: torch.Tensor, theta: torch.Tensor, norm: str | None) -> torch.Tensor:
    if norm == "filter":
        dims = tuple(range(1, d.dim()))
        norm_of = torch.linalg.vector_norm
        return d * norm_of(theta, dim=dims, keepdim=True) / (norm_of(d, dim=dims, keepdim=True) + 1e-10)
    if norm == "layer":
        return d * theta.norm() / (d.norm() + 1e-10)
    return d


def random_direction(model: nn.Module, seed: Seed = 0, norm: str | None = "filter",
                     ignore: str | None = "biasbn") -> Direction:
    r"""A Gaussian direction over every parameter, normalised per filter, per tensor or not at all.

    Normalisation ``"filter"``, ``"layer"`` or ``None``; reproducible from ``seed``; the global RNG is untouched.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> d = random_direction(model, seed=0)
    >>> torch.allclose(d["0.weight"].norm(dim=1), model[0].weight.detach().norm(dim=1))   # filter-normalised
    True
    >>> bool((d["0.bias"] == 0).all())                                                     # ignore="biasbn"
    True
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be one of {IGNORES}, got {ignore!r}")
    gen = make_generator(seed)
    out = {}
    for name, p in model.named_parameters():
        theta = p.detach()
        d = torch.randn(theta.shape, generator=gen, dtype=torch.float64).to(device=theta.device, dtype=theta.dtype)
        if theta.dim() <= 1:
            d = torch.zeros_like(theta) if ignore == "biasbn" else theta.clone()
        else:
            d = _normalise(d, theta, norm)
        out[name] = d
    return out


def eigen_direction(model: nn.Module, loss_fn: Any, data: Any, k: int = 1, seed: Seed = 0, tol: float = 1e-8,
                    *, operator: OperatorSpec = "hessian", **operator_kwargs: Any) -> list[Direction]:
    r"""The top-``k`` Hessian eigenvectors as unit directions (a list of ``k`` dicts, largest first).

    Parameters outside ``params=`` (if given) get zero entries; ``tol`` is the eigenvalues' relative
    error bound (the vectors' residuals are then about its square root). Each vector's sign is fixed so that
    its largest-magnitude entry is positive, making directions reproducible.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> d1, d2 = eigen_direction(model, F.cross_entropy, (x, y), k=2)
    >>> sorted(d1) == sorted(n for n, _ in model.named_parameters())
    True
    """
    H = build_operator(operator, model, loss_fn, data, **operator_kwargs)
    res = eigenvalues(H, k=k, seed=seed, tol=tol, progress=False)
    directions = []
    for j in range(k):
        v = res.vectors[:, j]
        v = v * torch.sign(v[v.abs().argmax()])
        chunks = dict(zip(H.param_names, H.split(v)))
        directions.append({name: chunks[name].to(p.dtype) if name in chunks else torch.zeros_like(p.detach())
                           for name, p in model.named_parameters()})
    return directions


def direction_to(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> Direction:
    """The direction from the model's weights to another set (``state_dict[name] - theta``), for interpolation.

    >>> model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    >>> d = direction_to(model, other.state_dict())
    >>> torch.allclose(model.weight.detach() + d["weight"], other.weight.detach())
    True
    """
    out = {}
    for name, p in model.named_parameters():
        if name not in state_dict:
            raise KeyError(f"state_dict has no entry {name!r}; it must come from a model of the same architecture")
        target = state_dict[name]
        if target.shape != p.shape:
            raise ValueError(f"{name!r} has shape {tuple(target.shape)} in state_dict, {tuple(p.shape)} in the model")
        out[name] = target.detach().to(device=p.device, dtype=p.dtype) - p.detach()
    return out
