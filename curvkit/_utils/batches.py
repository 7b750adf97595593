"""Data as curvkit takes it: one batch, or a re-iterable collection of batches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one batch: a tensor, a mapping, or a tuple/list whose first element is a tensor."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    return isinstance(data, (tuple, list)) and len(data) > 0 and isinstance(data[0], torch.Tensor)


def as_batches(data: Any) -> Sequence[Any] | Iterable[Any]:
    """A re-iterable collection of batches (one batch becomes a one-element list).

    Raises:
        ValueError: ``data`` is None.
        TypeError: ``data`` is neither a batch nor an iterable, or is a one-shot iterator.
    """
    if data is None:
        raise ValueError("data is None; pass one batch (inputs, targets) or an iterable of batches")
    if is_single_batch(data):
        return [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a batch (inputs, targets) or an iterable of batches, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(
            "data is a one-shot iterator (e.g. a generator); curvature algorithms pass over the data "
            "many times: pass a DataLoader, a list of batches, or list(iterator)"
        )
    return data


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor (1 if it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, Mapping, tuple, list)):
            return batch_size(item)
    return 1


def inputs_of(batch: Any) -> Any:
    """The model's inputs in a batch: the first element of an ``(inputs, targets)`` pair, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def empty_data_error() -> ValueError:
    """The error for data that yielded no batch or no samples."""
    return ValueError("data is empty: it yielded no batch or no samples")
