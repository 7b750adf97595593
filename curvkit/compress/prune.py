r"""Structured channel pruning by Hessian-aware (HAP) or magnitude importance.

HAP (Yu et al. 2022) scores output channel c of a layer by S_c = tr(H_cc)/n_c ||w_c||^2 (a
second-order estimate of the loss increase from zeroing it); the baselines are ||w_c||_2 and
||w_c||_1. One global threshold ranks channels across layers, with a per-layer cap; every layer
keeps at least one channel and the classifier's outputs are never pruned. Masks are applied with
``torch.nn.utils.prune.custom_from_mask`` on a copy of the model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from .._utils.batches import as_batches, to_device
from .._utils.progress import progress_bar
from .._utils.random import Seed
from ..hessian import HessianOperator
from .sensitivity import sensitivity, weight_layers

METHODS = ("hessian", "quadratic", "l2", "l1")


def channel_scores(model: nn.Module, loss_fn: Any, data: Any, method: str = "hessian", seed: Seed = 0,
                   **sensitivity_kwargs: Any) -> pd.DataFrame:
    """Importance of every output channel of every Linear/Conv layer: columns ``module, channel, score``."""
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


def _quadratic_scores(model: nn.Module, loss_fn: Any, data: Any, layers: dict[str, nn.Module],
                      **operator_kwargs: Any) -> pd.DataFrame:
    r"""S_c = w_c^T H_cc w_c exactly: one Hessian product per channel, in lock-step blocks.

    At a minimum, zeroing channel c raises the loss by about S_c / 2 (the second-order Taylor term
    of the step -w_c); unlike HAP's tr(H_cc)/n_c ||w_c||^2 it uses the channel's actual direction.
    """
    operator_kwargs.pop("rtol", None)
    operator_kwargs.pop("max_matvecs", None)
    progress = operator_kwargs.pop("progress", None)
    params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    H = HessianOperator(model, loss_fn, data, params=params, **operator_kwargs)
    offsets = dict(zip(H.param_names, np.cumsum([0, *[p.numel() for p in H.params[:-1]]]).tolist()))
    theta = H.flatten([p.detach() for p in H.params]).to(torch.float64)
    spans = []
    for name, module in layers.items():
        weight, bias = (f"{name}.{n}" if name else n for n in ("weight", "bias"))
        per = module.weight[0].numel()
        for c in range(module.weight.shape[0]):
            idx = [torch.arange(offsets[weight] + c * per, offsets[weight] + (c + 1) * per)]
            if bias in offsets:
                idx.append(torch.tensor([offsets[bias] + c]))
            spans.append((name, c, torch.cat(idx)))
    scores = []
    with progress_bar(total=len(spans), desc="channel quadratic forms", enable=progress) as bar:
        for start in range(0, len(spans), H.max_block):
            chunk = spans[start:start + H.max_block]
            V = torch.zeros(H.shape[0], len(chunk), dtype=torch.float64, device=H.device)
            for j, (_, _, idx) in enumerate(chunk):
                V[idx, j] = theta[idx]
            scores.extend((V * (H @ V)).sum(0).tolist())
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
        """The layer's output with the implant's output added to its pruned channels."""
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

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> pmodel = prune_channels(model, F.cross_entropy, (x, y), amount=0.5, method="hessian")
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
        keep = torch.ones(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
        keep[gone] = 0
        prune.custom_from_mask(layer, "weight", keep.reshape(-1, *[1] * (layer.weight.dim() - 1)).expand_as(
            layer.weight).clone())
        if layer.bias is not None:
            prune.custom_from_mask(layer, "bias", keep.clone())
        bn = followers.get(name)
        if bn is not None and bn.affine:
            prune.custom_from_mask(bn, "weight", keep.clone())
            prune.custom_from_mask(bn, "bias", keep.clone())
        if implant:
            ranked = group[group["pruned"]].sort_values("score", ascending=False)
            moderate = ranked["channel"].tolist()[: max(1, len(ranked) // 2)]
            _replace(pruned, name, Implanted(layer, moderate))
    pruned.pruning_table = table
    pruned.pruning_skipped = skipped
    return pruned


def _batchnorm_after(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm that directly follows each Linear/Conv in module order with matching width.

    Its channels are masked with the layer's, so a pruned channel outputs exactly zero (as if removed).
    """
    named = list(model.named_modules())
    out = {}
    for (name, module), (_, nxt) in zip(named, named[1:]):
        if isinstance(module, _WEIGHT_LAYERS) and isinstance(nxt, nn.modules.batchnorm._BatchNorm) \
                and nxt.num_features == module.weight.shape[0]:
            out[name] = nxt
    return out


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on models pruned with ``torch.nn.utils.prune``.

    A pruned module's ``weight`` is the non-leaf ``weight_orig * weight_mask``, which deepcopy refuses;
    it is copied as a plain tensor (the forward pre-hook recomputes it anyway).
    """
    memo = {id(t): t.detach().clone() for m in model.modules() for n in ("weight", "bias")
            if hasattr(m, n + "_orig") for t in [getattr(m, n)]}
    return copy.deepcopy(model, memo)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def remove_channels(model: nn.Module) -> nn.Module:
    """Physically remove zeroed output channels from a plain ``nn.Sequential`` chain (a smaller copy).

    Supports Linear, Conv1d/2d/3d (groups=1), BatchNorm, Flatten and parameter-free layers between
    them; the next weight layer loses the matching inputs. Masks from :func:`prune_channels` are
    made permanent first; the function (outputs) is unchanged.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("remove_channels handles plain nn.Sequential chains; keep the masked model otherwise")
    model = copy_model(model)
    for module in model:
        for pname in ("weight", "bias"):
            if hasattr(module, pname + "_orig"):
                prune.remove(module, pname)
    layers = list(model)
    keep, flattened = None, False
    for i, layer in enumerate(layers):
        weighted = isinstance(layer, _WEIGHT_LAYERS)
        if keep is not None:
            if isinstance(layer, nn.Flatten):
                flattened = True
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layers[i] = _take(layer, keep, ("weight", "bias", "running_mean", "running_var"), "num_features")
            elif weighted:
                layers[i] = _take_inputs(layer, keep, flattened)
                keep = None
            elif any(True for _ in layer.parameters()):
                raise ValueError(f"remove_channels cannot pass channels through {type(layer).__name__}")
        if weighted:
            w = layers[i].weight.detach()
            alive = w.reshape(w.shape[0], -1).abs().sum(1) > 0
            if layers[i].bias is not None:
                alive |= layers[i].bias.detach() != 0
            if alive.any() and not alive.all():
                out_attr = "out_features" if isinstance(layer, nn.Linear) else "out_channels"
                layers[i] = _take(layers[i], alive, ("weight", "bias"), out_attr)
                keep, flattened = alive, False
    return nn.Sequential(*layers)


_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _take(layer: nn.Module, keep: torch.Tensor, names: tuple[str, ...], size_attr: str) -> nn.Module:
    """A copy of ``layer`` with the ``keep`` entries (dim 0) of the named parameters/buffers."""
    new = copy.deepcopy(layer)
    for name in names:
        value = getattr(layer, name, None)
        if value is None:
            continue
        kept = value.detach()[keep].clone()
        setattr(new, name, nn.Parameter(kept) if isinstance(value, nn.Parameter) else kept)
    setattr(new, size_attr, int(keep.sum()))
    return new


def _take_inputs(layer: nn.Module, keep: torch.Tensor, flattened: bool) -> nn.Module:
    """A copy of a Linear/Conv layer without the inputs of removed channels (after Flatten: their features)."""
    if getattr(layer, "groups", 1) != 1:
        raise ValueError("remove_channels does not handle grouped convolutions")
    span = layer.in_features // keep.numel() if flattened else 1
    cols = keep.repeat_interleave(span)
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(layer.weight.detach()[:, cols].clone())
    setattr(new, "in_features" if isinstance(layer, nn.Linear) else "in_channels", int(cols.sum()))
    return new


def recalibrate_bn(model: nn.Module, data: Any, max_batches: int | None = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``data`` (after pruning).

    Statistics are reset and accumulated as a cumulative average (momentum None) over the batches in
    train mode, without gradients; the copy is returned in eval mode.
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
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(to_device(inputs, device))
    return model.eval()
