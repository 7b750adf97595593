r"""Unstructured and N:M weight pruning of a model copy (one shot, no fine-tuning).

The weights are every parameter with more than one dimension (Linear, conv and embedding
weights; not biases or normalisation scales), the same set :class:`curvkit.optim.CrAM` compresses
during training, so a model trained with CrAM at some sparsity is pruned here exactly as it was
perturbed. Masks come from :mod:`curvkit.compress.masks` and are applied with
``torch.nn.utils.prune.custom_from_mask``.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn
from torch.nn.utils import prune

from .._utils.layers import qualified
from .masks import magnitude_masks, nm_masks, parse_nm
from .surgery import copy_model

DEFAULT_AMOUNT = 0.9


def prune_weights(model: nn.Module, amount: float | None = None, pattern: str = "global", *,
                  exclude: Collection[str] = ()) -> nn.Module:
    r"""A copy of ``model`` with the smallest-magnitude weights masked to zero; ``model`` is not changed.

    ``pattern="global"`` ranks all weights together (one threshold, layers end up with different
    sparsities), ``"layer"`` prunes the same fraction of every weight, and ``"N:M"`` (``"2:4"``,
    ``"4:8"``) keeps the N largest of every M consecutive weights along the input dimension, the
    layout sparse tensor cores run (see :mod:`curvkit.compress.masks`). Exactly round(amount n)
    weights are pruned per ranking; ties prune the earlier weight. The copy carries
    ``weight_orig`` and ``weight_mask`` as ``torch.nn.utils.prune`` does (``prune.remove`` makes
    them permanent); a model pruned before is pruned again from its masked weights. BatchNorm
    statistics are left as they were: follow with :func:`curvkit.compress.recalibrate_bn`.

    Args:
        model: the model to prune (left untouched).
        amount: the fraction of weights to zero, in [0, 1); default 0.9. An N:M pattern fixes it at
            1 - N/M: leave it unset or pass that value.
        pattern: ``"global"``, ``"layer"`` or ``"N:M"``.
        exclude: names of weights to leave dense, as in ``model.named_parameters()`` (a pruned one
            without ``_orig``), e.g. ``{"0.weight"}`` for a first convolution with one input channel
            under N:M.

    Returns:
        The pruned copy, in the mode ``model`` was in.

    Raises:
        ValueError: for an amount outside [0, 1) or at odds with an N:M pattern, an unknown pattern
            or excluded name, a model without weights, or an N:M layer whose input dimension is not
            a multiple of M (named in the message).

    Example:
        .. code-block:: python

            sparse = prune_weights(model, amount=0.9)                       # global magnitude
            sparse = recalibrate_bn(sparse, train_loader, max_batches=20)   # BatchNorm after pruning
            semi = prune_weights(model, pattern="2:4", exclude={"conv1.weight"})
    """
    nm = None if pattern in ("global", "layer") else _nm_or_error(pattern)
    if nm is not None and amount is not None and abs(amount - (1 - nm[0] / nm[1])) > 1e-12:
        raise ValueError(f"pattern {pattern!r} prunes a fraction {1 - nm[0] / nm[1]:g} of the weights; "
                         f"leave amount unset or pass that value, not {amount!r}")
    amount = DEFAULT_AMOUNT if amount is None else amount
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be a fraction in [0, 1), got {amount!r}")
    pruned = copy_model(model)
    targets = {qualified(module_name, name): (module, name) for module_name, module in pruned.named_modules()
               for name in _weight_names(module)}
    unknown = set(exclude) - set(targets)
    if unknown:
        raise ValueError(f"exclude names {sorted(unknown)}, which are not weights of the model; "
                         f"its weights are {list(targets)}")
    targets = {key: target for key, target in targets.items() if key not in exclude}
    if not targets:
        raise ValueError("nothing to prune: the model has no weights (parameters with more than one dimension) "
                         "outside exclude")
    for module, name in targets.values():
        if hasattr(module, name + "_orig"):
            prune.remove(module, name)
    weights = [getattr(module, name) for module, name in targets.values()]
    if nm is not None:
        try:
            masks = nm_masks(weights, pattern, names=list(targets))
        except ValueError as err:
            raise ValueError(f"{err} prune_weights: list it in exclude=.") from None
    else:
        masks = magnitude_masks(weights, amount, per_tensor=pattern == "layer")
    for (module, name), mask, weight in zip(targets.values(), masks, weights):
        prune.custom_from_mask(module, name, mask.to(weight.dtype))
    return pruned


def _weight_names(module: nn.Module) -> list[str]:
    """The module's own weights (parameters with dim > 1).

    A pruned weight is named by its masked name (``weight``, not ``weight_orig``).
    """
    names = []
    for name, p in module.named_parameters(recurse=False):
        if p.dim() > 1:
            masked = name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask")
            names.append(name[: -len("_orig")] if masked else name)
    return names


def _nm_or_error(pattern: str) -> tuple[int, int]:
    try:
        return parse_nm(pattern)
    except ValueError:
        raise ValueError(f"pattern must be 'global', 'layer' or 'N:M' such as '2:4' or '4:8'; got {pattern!r}") \
            from None
