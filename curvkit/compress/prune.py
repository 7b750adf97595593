r"""Structured channel pruning by Hessian-aware (HAP) or magnitude importance.

HAP (Yu et al. 2022) scores output channel c of a layer by S_c = tr(H_cc)/n_c ||w_c||^2 (a
second-order estimate of the loss increase from zeroing it); the baselines are ||w_c||_2 and
||w_c||_1. One global threshold ranks channels across layers, with a per-layer cap; every layer
keeps at least one channel and the classifier's outputs are never pruned. Masks are applied with
``torch.nn.utils.prune.custom_from_mask`` on a copy of the model; :mod:`.surgery` copies pruned
models and removes zeroed channels for good.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from .._utils.batches import as_batches, inputs_of, to_device
from .._utils.borrow import ForwardFn
from .._utils.layers import WEIGHT_LAYERS
from .._utils.progress import progress_bar
from .._utils.random import Seed
from ..hessian import build_operator
from ..hessian.factory import OperatorSpec
from ..hessian.layerwise import channel_spans
from ..hessian.operator import matmat_float64
from .sensitivity import sensitivity, weight_layers
from .surgery import copy_model, replace_submodule

METHODS = ("hessian", "quadratic", "l2", "l1")


def channel_scores(model: nn.Module, loss_fn: Any, data: Any, method: str = "hessian", seed: Seed = 0,
                   **sensitivity_kwargs: Any) -> pd.DataFrame:
    """Importance of every output channel of every Linear/Conv layer: columns ``module, channel, score``.

    ``sensitivity_kwargs`` go to :func:`~curvkit.compress.sensitivity` (``"hessian"``) or to the
    operator (``"quadratic"``), including ``operator="hessian" | "ggn" | factory`` and ``forward=``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "hessian":
        sens = sensitivity(model, loss_fn, data, "channel", seed=seed, **sensitivity_kwargs)
        return sens.assign(score=sens["hap"])[["module", "channel", "score"]]
    layers, _ = weight_layers(model)
    if method == "quadratic":
        return _quadratic_scores(model, loss_fn, data, layers, **sensitivity_kwargs)
    order = 2 if method == "l2" else 1
    rows = []
    for name, module in layers.items():
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        if module.bias is not None:
            w = torch.cat([w, module.bias.detach()[:, None]], 1)
        for c, s in enumerate(torch.linalg.vector_norm(w.double(), ord=order, dim=1).tolist()):
            rows.append({"module": name, "channel": c, "score": s})
    return pd.DataFrame(rows)


def _quadratic_scores(model: nn.Module, loss_fn: Any, data: Any, layers: dict[str, nn.Module], *,
                      operator: OperatorSpec = "hessian", progress: bool | None = None, rtol: float | None = None,
                      max_matvecs: int | None = None, **operator_kwargs: Any) -> pd.DataFrame:
    r"""S_c = w_c^T H_cc w_c exactly: one product per channel, in lock-step blocks.

    At a minimum, zeroing channel c raises the loss by about S_c / 2 (the second-order Taylor term
    of the step -w_c); unlike HAP's tr(H_cc)/n_c ||w_c||^2 it uses the channel's actual direction.
    H is ``operator`` (``"hessian"``, ``"ggn"`` or a factory, see :func:`~curvkit.hessian.build_operator`)
    over the layers' weights and biases; ``rtol`` and ``max_matvecs`` (of the sampled scores) do not apply.
    """
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    H = build_operator(operator, model, loss_fn, data, params=params, **operator_kwargs)
    offsets = dict(zip(H.param_names, H.offsets))
    theta = torch.cat([p.detach().reshape(-1) for p in H.params]).to(device=H.device, dtype=torch.float64)
    spans = [(name, c, channel) for name, module in layers.items()
             for c, channel in enumerate(channel_spans(offsets, name, module))]
    scores, block = [], getattr(H, "max_block", 16)
    with progress_bar(total=len(spans), desc="channel quadratic forms", enable=progress) as bar:
        for start in range(0, len(spans), block):
            chunk = spans[start:start + block]
            V = torch.zeros(H.shape[0], len(chunk), dtype=torch.float64, device=H.device)
            for j, (_, _, channel) in enumerate(chunk):
                for lo, hi in channel:
                    V[lo:hi, j] = theta[lo:hi]
            scores.extend((V * matmat_float64(H, V)).sum(0).tolist())
            bar.update(len(chunk))
    return pd.DataFrame({"module": [s[0] for s in spans], "channel": [s[1] for s in spans], "score": scores})


def select_channels(scores: pd.DataFrame, amount: float, protect: set[str], max_per_layer: float) -> pd.DataFrame:
    """Mark the ``amount`` fraction of prunable channels with the lowest scores, under the per-layer cap."""
    df = scores.copy()
    df["pruned"] = False
    prunable = df[~df["module"].isin(protect)]
    caps = {m: min(int(np.floor(max_per_layer * len(g))), len(g) - 1) for m, g in prunable.groupby("module")}
    target = int(round(amount * len(prunable)))
    taken = dict.fromkeys(caps, 0)
    count = 0
    for idx in prunable.sort_values("score", kind="stable").index:
        if count >= target:
            break
        module = df.at[idx, "module"]
        if taken[module] < caps[module]:
            df.at[idx, "pruned"] = True
            taken[module] += 1
            count += 1
    return df


class Implanted(nn.Module):
    """A pruned layer plus a zero-initialised low-rank path that feeds its pruned channels (HAP's Neural Implant).

    Output = layer(x) + scatter(implant(x)) into the implanted channels; the implant (a 1x1 conv or a
    linear map to those channels) starts at zero, so the function is unchanged until it is trained.
    """

    def __init__(self, layer: nn.Module, channels: list[int]):
        super().__init__()
        self.layer = layer
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))
        weight = layer.weight
        if isinstance(layer, nn.Linear):
            self.implant = nn.Linear(layer.in_features, len(channels), bias=False)
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[weight.dim() - 2]
            self.implant = conv(layer.in_channels, len(channels), 1, stride=layer.stride, bias=False)
        self.implant.to(device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.implant.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with the implant's output added to the implanted channels."""
        out = self.layer(x)
        extra = self.implant(x)
        if extra.shape[2:] != out.shape[2:]:  # a kernel without padding shrinks the map; crop the 1x1 path
            extra = extra[(...,) + tuple(slice(0, s) for s in out.shape[2:])]
        return out.index_add(1, self.channels, extra)


def prune_channels(model: nn.Module, loss_fn: Any, data: Any, amount: float = 0.5, method: str = "hessian",
                   seed: Seed = 0, implant: bool = False, *, max_per_layer: float = 0.9,
                   classifier: str | None = None, scores: pd.DataFrame | None = None,
                   **sensitivity_kwargs: Any) -> nn.Module:
    r"""A pruned copy of ``model``: the ``amount`` fraction of output channels with the lowest importance zeroed.

    ``method``: ``"hessian"`` (HAP: tr(H_cc)/n_c ||w_c||^2, traces with adaptive probe counts),
    ``"quadratic"`` (w_c^T H_cc w_c exactly, one product per channel), ``"l2"`` or ``"l1"`` (channel
    norms). One global threshold across layers, at most ``max_per_layer``
    of a layer's channels and never all of them; the ``classifier`` (default: the last Linear/Conv
    layer) keeps all its outputs. Masks use ``torch.nn.utils.prune.custom_from_mask`` (weight and
    bias; a BatchNorm directly after the layer is masked too, so a pruned channel outputs zero).
    ``implant=True`` gives the more sensitive half of each layer's pruned channels a
    zero-initialised low-rank path (:class:`Implanted`) to fine-tune. The pruning table is in
    ``pruned.pruning_table``; non-Linear/Conv modules are listed in ``pruned.pruning_skipped``.
    ``scores`` (from :func:`channel_scores`) reuses importances across several amounts.

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> pmodel = prune_channels(model, F.cross_entropy, (x, y), amount=0.5, method="l2")
    >>> int(pmodel.pruning_table["pruned"].sum()), int((pmodel[0].weight.abs().sum(1) == 0).sum())
    (8, 8)
    """
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be a fraction in [0, 1), got {amount!r}")
    if not 0 < max_per_layer <= 1:
        raise ValueError(f"max_per_layer must be in (0, 1], got {max_per_layer!r}")
    layers, skipped = weight_layers(model)
    classifier = list(layers)[-1] if classifier is None else classifier
    if classifier not in layers:
        raise ValueError(f"classifier {classifier!r} is not a Linear/Conv layer of the model: {list(layers)}")
    if scores is None:
        scores = channel_scores(model, loss_fn, data, method, seed, **sensitivity_kwargs)
    table = select_channels(scores, amount, {classifier}, max_per_layer)
    pruned = copy_model(model)
    modules = dict(pruned.named_modules())
    followers = _batchnorm_after(pruned)
    for name, group in table.groupby("module", sort=False):
        gone = group.loc[group["pruned"], "channel"].tolist()
        if not gone:
            continue
        layer = modules[name]
        _mask_channels(layer, gone, followers.get(name))
        if implant:
            ranked = group[group["pruned"]].sort_values("score", ascending=False)
            moderate = ranked["channel"].tolist()[: max(1, len(ranked) // 2)]
            replace_submodule(pruned, name, Implanted(layer, moderate))
    pruned.pruning_table = table
    pruned.pruning_skipped = skipped
    return pruned


def _mask_channels(layer: nn.Module, gone: list[int], bn: nn.Module | None) -> None:
    """Zero the output channels ``gone`` of a Linear/Conv layer (and of the BatchNorm after it) with prune masks."""
    keep = torch.ones(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
    keep[gone] = 0
    prune.custom_from_mask(layer, "weight", keep.reshape(-1, *[1] * (layer.weight.dim() - 1)).expand_as(
        layer.weight).clone())
    if layer.bias is not None:
        prune.custom_from_mask(layer, "bias", keep.clone())
    if bn is not None and bn.affine:
        prune.custom_from_mask(bn, "weight", keep.clone())
        prune.custom_from_mask(bn, "bias", keep.clone())


def _batchnorm_after(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm that directly follows each Linear/Conv in module order with matching width.

    Its channels are masked with the layer's, so a pruned channel outputs exactly zero (as if removed).
    """
    named = list(model.named_modules())
    out = {}
    for (name, module), (_, nxt) in zip(named, named[1:]):
        if isinstance(module, WEIGHT_LAYERS) and isinstance(nxt, nn.modules.batchnorm._BatchNorm) \
                and nxt.num_features == module.weight.shape[0]:
            out[name] = nxt
    return out


def recalibrate_bn(model: nn.Module, data: Any, max_batches: int | None = None, *,
                   forward: ForwardFn | None = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``data`` (after pruning).

    Statistics are reset and accumulated as a cumulative average (momentum None) over the batches in
    train mode, without gradients; the copy is returned in eval mode. Each batch goes through
    ``forward(copy, batch)`` (its result is ignored), by default ``copy(inputs)`` of an
    ``(inputs, targets)`` pair or of a batch of inputs.
    """
    model = copy_model(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i, batch in enumerate(as_batches(data)):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, device)
            if forward is None:
                model(inputs_of(batch))
            else:
                forward(model, batch)
    return model.eval()
