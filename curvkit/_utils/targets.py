"""Class-index targets of the losses that take them (cross-entropy, negative log-likelihood).

torch indexes the outputs with these targets, so a label out of range raises an ``IndexError`` deep
inside the loss (or a device-side assert on CUDA), and curvature that does not depend on the targets
(the GGN of a cross-entropy) would not notice it at all. They are checked once per batch instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CLASS_INDEX_FUNCTIONS = (F.cross_entropy, F.nll_loss)
_CLASS_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def class_index_options(loss_fn: Any) -> tuple[int, str] | None:
    """``(ignore_index, reduction)`` of a loss that takes class-index targets, None for any other loss.

    Recognises ``F.cross_entropy`` and ``F.nll_loss`` (their defaults: -100, ``"mean"``) and
    ``nn.CrossEntropyLoss``/``nn.NLLLoss`` modules (their attributes).
    """
    if any(loss_fn is f for f in _CLASS_INDEX_FUNCTIONS):
        return -100, "mean"
    if isinstance(loss_fn, _CLASS_INDEX_MODULES):
        return loss_fn.ignore_index, loss_fn.reduction
    return None


def check_class_targets(loss_fn: Any, outputs: Any, targets: Any) -> None:
    """Refuse class-index targets that are neither a class of ``outputs`` nor the loss's ``ignore_index``.

    Does nothing for other losses and for probability (floating-point) targets. The classes are
    dimension 1 of ``outputs`` (dimension 0 for one unbatched example).

    Raises:
        ValueError: a target is out of range (the message names it and the number of classes), or every
            target of a mean-reduced loss is ignored (the mean is then 0/0).
    """
    options = class_index_options(loss_fn)
    if (options is None or not isinstance(targets, torch.Tensor) or not isinstance(outputs, torch.Tensor)
            or targets.is_floating_point() or targets.is_complex() or outputs.dim() == 0):
        return
    ignore_index, reduction = options
    classes = outputs.shape[1] if outputs.dim() > 1 else outputs.shape[0]
    kept = targets != ignore_index
    bad = kept & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        label = int(targets[bad].flatten()[0])
        raise ValueError(
            f"class target {label} is out of range for {classes} classes: targets must be in [0, {classes - 1}] "
            f"or equal ignore_index={ignore_index}; fix the labels (e.g. 1-based labels need y - 1) or the "
            "model's number of outputs, and mark targets to skip with the loss's ignore_index"
        )
    if reduction == "mean" and targets.numel() > 0 and not bool(kept.any()):
        raise ValueError(f"every target of a batch equals ignore_index={ignore_index}, so its mean loss is 0/0 "
                         "(NaN); drop batches that have no target to learn from")
