"""Model surgery for pruning: copies of pruned models, swapping submodules, physically removing channels."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune

from .._utils.layers import WEIGHT_LAYERS

__all__ = ["copy_model", "remove_channels", "replace_submodule"]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on models pruned with ``torch.nn.utils.prune``.

    A pruned module's ``weight`` is the non-leaf ``weight_orig * weight_mask``, which deepcopy refuses;
    it is copied as a plain tensor (the forward pre-hook recomputes it anyway).
    """
    memo = {id(t): t.detach().clone() for m in model.modules() for n in ("weight", "bias")
            if hasattr(m, n + "_orig") for t in [getattr(m, n)]}
    return copy.deepcopy(model, memo)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def remove_channels(model: nn.Module) -> nn.Module:
    """Physically remove zeroed output channels from a plain ``nn.Sequential`` chain (a smaller copy).

    Supports Linear, Conv1d/2d/3d (groups=1), BatchNorm, Flatten and parameter-free layers between
    them; the next weight layer loses the matching inputs. Masks from :func:`~curvkit.compress.prune_channels` are
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
        weighted = isinstance(layer, WEIGHT_LAYERS)
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
