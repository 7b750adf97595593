r"""Weight masks for pruning: global or per-tensor magnitude top-k, and N:M semi-structured sparsity.

Pure tensor functions: tensors in, boolean masks out (``True`` keeps an entry). They never change
their inputs; :func:`curvkit.compress.prune_weights` applies them to a copy of a model and
:class:`curvkit.optim.CrAM` uses them at every step.

**Magnitude top-k.** With sparsity s over entries w_1..w_n, exactly k = round(s n) entries are
pruned (``round`` as in ``torch.nn.utils.prune``): every |w_i| below the k-th smallest magnitude
t, and as many of those equal to t as the count needs. Among equal magnitudes the entry that comes
first (earlier tensor, then lower flat index) is pruned first, so the masks are deterministic.

**N:M.** In every group of M consecutive entries along dim 1 (the input features of a Linear
weight ``(out, in)``, the input channels of a conv weight ``(out, in, *kernel)``), the M - N
smallest magnitudes are pruned, ties again pruning the earlier entry. This is the layout sparse
tensor cores use: the groups run along the reduction dimension of the matrix product, which is
``in`` for a Linear layer and, for a convolution lowered to a product in channels-last order
(K = kh * kw * in with ``in`` innermost), the input channels at each kernel tap. dim 1 must be a
multiple of M.

>>> import torch
>>> from curvkit.compress.masks import magnitude_masks, nm_masks
>>> w = torch.tensor([[0.1, 0.3, -0.2, 4.0], [5.0, 0.6, -0.7, 6.0]])
>>> magnitude_masks([w], 0.5)[0]            # the 4 smallest of all 8 entries
tensor([[False, False, False,  True],
        [ True, False,  True,  True]])
>>> nm_masks([w], "2:4")[0]                  # the 2 smallest of each group of 4
tensor([[False,  True, False,  True],
        [ True, False, False,  True]])
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import torch

MAX_CONCAT = 1 << 17
"""Up to this many entries, :func:`kth_smallest_magnitude` concatenates the magnitudes for ``torch.kthvalue``
(faster there: the radix select pays a fixed 65,536-bin histogram per tensor and pass; above, it is the faster one,
3-4x at a million entries on one CPU thread)."""

_DIGIT = 16  # bits per radix-select pass


def kth_smallest_magnitude(tensors: Sequence[torch.Tensor], k: int, *, max_concat: int = MAX_CONCAT) -> torch.Tensor:
    r"""The k-th smallest |w| over all entries of ``tensors`` (k counted from 1), exactly.

    Up to ``max_concat`` entries in all, the magnitudes are concatenated and ``torch.kthvalue``
    answers. Above, nothing is concatenated: a radix select on the IEEE-754 bit patterns (for
    non-negative floats the pattern, read as an integer, orders like the value) finds the answer
    16 bits at a time. Each pass histograms one 16-bit digit of the entries that share the digits
    found so far (``torch.bincount`` with 65,536 bins, one tensor at a time) and keeps the digit
    where the cumulative count reaches k: two passes for float32, four for float64 (half precision
    is widened to float32, exactly). The answer is exact, not a quantile estimate; extra memory is
    the temporaries of the largest tensor, not a copy of all of them (BENCHMARKS.md measures both).

    Args:
        tensors: the tensors whose entries are ranked together (any shapes, floating point).
        k: the rank, 1 <= k <= total number of entries.
        max_concat: the largest total size handled by concatenation.

    Returns:
        A 0-dim tensor on the CPU in the widest dtype of ``tensors`` (float32 at least).

    Raises:
        ValueError: if k is outside [1, number of entries] or a tensor is not floating point.
    """
    tensors = list(tensors)
    n = sum(t.numel() for t in tensors)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of entries), got {k}")
    dtype = _common_float(tensors)
    if n <= max_concat:
        flat = torch.empty(n, dtype=dtype, device=tensors[0].device)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            torch.abs(t.detach().reshape(-1).to(device=flat.device, dtype=dtype), out=part)
        return flat.kthvalue(k).values.cpu()
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    width = torch.finfo(dtype).bits
    prefix = 0
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        counts = torch.zeros(1 << _DIGIT, dtype=torch.int64)
        for t in tensors:
            bits = t.detach().abs().to(dtype).view(as_int).reshape(-1)
            if shift + _DIGIT < width:
                bits = bits[(bits >> (shift + _DIGIT)) == prefix]
            counts += torch.bincount((bits >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT).cpu()
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, k))
        k -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT) | digit
    return torch.tensor(prefix, dtype=as_int).view(dtype)


def magnitude_masks(tensors: Sequence[torch.Tensor], sparsity: float, *, per_tensor: bool = False,
                    max_concat: int = MAX_CONCAT) -> list[torch.Tensor]:
    r"""Keep-masks that prune the ``sparsity`` fraction of smallest magnitudes, globally or per tensor.

    Globally (default) one threshold ranks all entries of all tensors, so layers end up with
    different sparsities; ``per_tensor=True`` prunes round(s n_i) entries of each tensor. The
    threshold is :func:`kth_smallest_magnitude` (exact; no concatenation for large models).

    Args:
        tensors: the weights (any shapes, floating point).
        sparsity: the fraction s in [0, 1) to prune; exactly round(s n) entries are pruned.
        per_tensor: rank each tensor on its own instead of all together.
        max_concat: passed to :func:`kth_smallest_magnitude`.

    Returns:
        One boolean mask per tensor, same shape and device, ``True`` where the entry is kept.

    Raises:
        ValueError: if ``sparsity`` is outside [0, 1).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    tensors = list(tensors)
    if per_tensor:
        return [m for t in tensors for m in _top_k([t], sparsity, max_concat)]
    return _top_k(tensors, sparsity, max_concat)


def _top_k(tensors: list[torch.Tensor], sparsity: float, max_concat: int) -> list[torch.Tensor]:
    """Masks pruning exactly round(s n) entries of ``tensors`` ranked together; ties prune the earliest."""
    n = sum(t.numel() for t in tensors)
    pruned = round(sparsity * n)
    if pruned == 0:
        return [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    threshold = kth_smallest_magnitude(tensors, pruned, max_concat=max_concat)
    dtype = threshold.dtype
    magnitudes = [t.detach().abs().to(dtype) for t in tensors]
    keeps = [a > threshold.to(a.device) for a in magnitudes]
    kept_ties = n - pruned - int(sum(k.sum().cpu() for k in keeps))  # ties at the threshold still to keep
    for keep, a in zip(reversed(keeps), reversed(magnitudes)):  # keep the last ties: the earliest are pruned
        if kept_ties <= 0:
            break
        tie = a == threshold.to(a.device)
        from_end = tie.reshape(-1).flip(0).cumsum(0).flip(0).view_as(tie)
        keep |= tie & (from_end <= kept_ties)
        kept_ties -= int(tie.sum())
    return keeps


def parse_nm(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M.

    Raises:
        ValueError: unless ``pattern`` reads ``"N:M"`` with integers 0 < N < M.
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"an N:M pattern reads 'N:M' with integers 0 < N < M, such as '2:4' or '4:8'; got {pattern!r}")
    return int(match[1]), int(match[2])


def nm_masks(tensors: Sequence[torch.Tensor], pattern: str = "2:4",
             names: Sequence[str] | None = None) -> list[torch.Tensor]:
    r"""Keep-masks with N of every M consecutive entries along dim 1 kept (the largest magnitudes).

    Args:
        tensors: weights with at least 2 dims, dim 1 a multiple of M (Linear ``(out, in)``, conv
            ``(out, in, *kernel)``).
        pattern: ``"N:M"``, e.g. ``"2:4"`` or ``"4:8"``.
        names: names for the tensors in error messages (parameter names, say).

    Returns:
        One boolean mask per tensor, ``True`` where the entry is kept; a fraction 1 - N/M is pruned.

    Raises:
        ValueError: for a malformed pattern, a tensor with fewer than 2 dims, or dim 1 not a
            multiple of M (the message names the tensor; leave such a layer dense).
    """
    n, m = parse_nm(pattern)
    tensors = list(tensors)
    names = [f"tensor {i}" for i in range(len(tensors))] if names is None else list(names)
    for name, t in zip(names, tensors):
        if t.dim() < 2 or t.shape[1] % m:
            raise ValueError(f"{pattern} sparsity groups {m} consecutive entries along dim 1 (the input features "
                             f"or channels), but {name} has shape {tuple(t.shape)}: "
                             f"{'it has no dim 1' if t.dim() < 2 else f'{t.shape[1]} is not a multiple of {m}'}. "
                             "Leave that layer dense.")
    return [_nm_mask(t, n, m) for t in tensors]


def _nm_mask(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Groups of m along dim 1: the m - n smallest magnitudes of each are pruned (stable: earlier first)."""
    grouped = t.detach().abs().movedim(1, -1)
    groups = grouped.reshape(-1, m)
    pruned = groups.sort(dim=1, stable=True).indices[:, : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, pruned, False)
    return keep.view(grouped.shape).movedim(-1, 1).contiguous()


def _common_float(tensors: list[torch.Tensor]) -> torch.dtype:
    """The widest floating dtype among ``tensors``, float32 at least (half precision widens exactly)."""
    if not tensors:
        raise ValueError("no tensors to rank")
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"magnitude masks rank floating-point tensors, got {t.dtype}")
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)

