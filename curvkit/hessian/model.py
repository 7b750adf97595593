"""Operators of a model's loss over data: the data loop, blocks of products, and torch.distributed."""

from __future__ import annotations

import datetime
import math
from abc import abstractmethod
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._utils.batches import as_batches, batch_size, empty_data_error, to_device
from .._utils.borrow import BorrowedLoss, ForwardFn, LossFn, ParamSpec, select_parameters
from .operator import CurvatureOperator

_DOUBLE_BACKWARD_HINTS = ("differentiate", "not implemented", "double backward", "once_differentiable")


def reraise_explained(err: RuntimeError, what: str):
    """Re-raise autograd's error for an operation without double backward as one that says what to do.

    Raises:
        RuntimeError: always; explained when ``err`` is about a missing double backward, else ``err`` itself.
    """
    if any(h in str(err) for h in _DOUBLE_BACKWARD_HINTS):
        raise RuntimeError(
            f"an operation in the model does not support double backward, which {what} need ({err}). "
            "Replace it with a twice-differentiable operation, or restrict params= to parameters after it."
        ) from err
    raise err


def _model_outputs(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


class ModelOperator(CurvatureOperator):
    r"""An operator of a model's data-averaged loss: H = sum_b (n_b / N) H_b over batches b.

    Owns the data loop: batches are weighted by sample count; the per-batch state (a gradient
    graph) of a single batch is built once and cached; a block of k products is computed in
    lock-step (each batch's state built once per block) in chunks of at most ``max_block``
    columns; under torch.distributed each rank's data is a shard and every block is
    all-reduced once (sample-count weighted). Subclasses define ``_prepare(batch)`` and
    ``_products(state, rows)``; those that need the model's outputs rather than a loss set
    ``ACCEPTS_FORWARD = False`` (their borrowed call then returns the outputs, and ``loss_fn`` is
    applied by the subclass).

    Args:
        model: the model, borrowed (never mutated).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (None when ``forward`` computes the loss).
        data: one batch ``(inputs, targets)`` or a re-iterable of batches (a DataLoader).
        params: the parameters to differentiate: None (all trainable ones), names, globs or Parameters.
        forward: ``forward(model, batch) -> loss`` for batches that are not ``(inputs, targets)`` pairs.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics, running ones untouched).
        max_block: the largest block of products computed in one pass over a batch.
        distributed: all-reduce over torch.distributed ranks (None: when a process group is initialised).
        timeout: seconds an all-reduce may take before a dead or hung rank is reported.

    Raises:
        TypeError: ``forward=`` given to an operator that does not accept it, or a bad loss/data type.
        ValueError: bad ``params``, ``max_block`` or ``bn_mode``, or active Dropout in the model.
        RuntimeError: ``distributed=True`` without an initialised process group.
    """

    ACCEPTS_FORWARD = True

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, data: Any, *, params: ParamSpec = None,
                 forward: ForwardFn | None = None, bn_mode: str = "eval", max_block: int = 16,
                 distributed: bool | None = None, timeout: float = 300.0):
        if not self.ACCEPTS_FORWARD:
            if forward is not None:
                raise TypeError(
                    f"{type(self).__name__} takes no forward=: it needs the model's outputs and "
                    "loss_fn(outputs, targets) separately, so pass batches (inputs, targets) and a loss_fn; "
                    "use HessianOperator for forward="
                )
            if not callable(loss_fn):
                raise TypeError("loss_fn must be a callable loss_fn(outputs, targets) -> scalar")
            forward = _model_outputs
        names, tensors = select_parameters(model, params)
        super().__init__(**self.of_tensors(tensors), names=names)
        if not isinstance(max_block, int) or max_block < 1:
            raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.max_block = max_block
        self.distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        if self.distributed and not dist.is_initialized():
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first")
        self.timeout = datetime.timedelta(seconds=timeout)
        self._loss = BorrowedLoss(model, loss_fn, names, forward=forward, bn_mode=bn_mode)
        self._batches = as_batches(data)
        self._single = isinstance(self._batches, list) and len(self._batches) == 1
        self._cached: Any = None
        self._batched_ok = True

    @property
    def single_batch(self) -> bool:
        """True when one cached per-batch state serves every product (blocks then save nothing)."""
        return self._single

    @abstractmethod
    def _prepare(self, batch: Any) -> Any:
        """Per-batch state reused by every product on that batch (e.g. the gradient graph)."""

    @abstractmethod
    def _products(self, state: Any, rows: torch.Tensor) -> torch.Tensor | None:
        """Products with the rows of ``rows`` (k, n) on one batch, as (k, n) (None if identically zero)."""

    def _single_state(self) -> Any:
        """The state of the only batch, built on first use and cached."""
        if self._cached is None:
            self._cached = self._prepare(to_device(self._batches[0], self.device))
        return self._cached

    def _states(self):
        """Yield ``(n_b, state)`` per local batch; a single batch's state is built once and cached."""
        if self._single:
            yield batch_size(self._batches[0]), self._single_state()
            return
        for batch in self._batches:
            yield batch_size(batch), self._prepare(to_device(batch, self.device))

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if not self._single or self.distributed:
            return super()._matvec(v)
        out = self._products(self._single_state(), v.to(self.dtype)[None])
        out = v.new_zeros(v.shape, dtype=self.dtype) if out is None else out[0]
        self._check_finite(out[None])
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.T.to(self.dtype).contiguous()
        blocks = [self._block(rows[i:i + self.max_block]) for i in range(0, rows.shape[0], self.max_block)]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        self._check_finite(out)
        return out.T

    def _block(self, rows: torch.Tensor) -> torch.Tensor:
        """Sample-weighted mean over batches (and ranks) of the products with ``rows`` (k, n)."""
        out = torch.zeros(rows.shape, dtype=torch.float64, device=self.device)
        total = 0
        for weight, state in self._states():
            total += weight
            block = self._products(state, rows)
            if block is None:
                continue
            if self._single and not self.distributed:
                return block.to(torch.float64)
            out.add_(block.to(torch.float64), alpha=weight)
        if self.distributed:
            total = self._all_reduce(out, total)
        if total == 0:
            raise empty_data_error()
        return out.div_(total)

    def _all_reduce(self, out: torch.Tensor, total: int) -> int:
        """Sum ``out`` and the sample count over ranks in one all-reduce; a dead or hung rank times out."""
        buf = torch.cat([out.reshape(-1), out.new_tensor([float(total)])])
        work = dist.all_reduce(buf, async_op=True)
        try:
            finished = work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise RuntimeError(f"a torch.distributed all-reduce did not finish within {self.timeout}: "
                               f"a rank died, hangs, or runs a different number of products ({err})") from err
        if finished is False:
            raise RuntimeError(f"a torch.distributed all-reduce did not finish within {self.timeout}")
        out.copy_(buf[:-1].view_as(out))
        return int(round(float(buf[-1])))

    def _check_finite(self, out: torch.Tensor) -> None:
        if math.isfinite(out.sum()):  # one reduction: any nan/inf makes the sum non-finite
            return
        for name, chunk in zip(self.param_names, torch.split(out, self.sizes, dim=1)):
            if not torch.isfinite(chunk).all():
                raise FloatingPointError(
                    f"a {type(self).__name__} product is not finite in the block of parameter {name!r}; "
                    "check the model for overflow (e.g. use float64 or a smaller learning rate)"
                )


