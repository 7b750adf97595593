"""Curvature operators: symmetric n x n linear maps defined by products, never stored densely."""

from __future__ import annotations

import datetime
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse.linalg import LinearOperator
from torch import nn

from ._model import BorrowedLoss, ForwardFn, LossFn, ParamSpec, as_batches, batch_size, select_parameters, to_device

_DOUBLE_BACKWARD_HINTS = ("differentiate", "not implemented", "double backward", "once_differentiable")


def reraise_explained(err: RuntimeError, what: str):
    """Re-raise autograd's error for an operation without double backward as one that says what to do."""
    if any(h in str(err) for h in _DOUBLE_BACKWARD_HINTS):
        raise RuntimeError(
            f"an operation in the model does not support double backward, which {what} need ({err}). "
            "Replace it with a twice-differentiable operation, or restrict params= to parameters after it."
        ) from err
    raise err


class CurvatureOperator(ABC):
    """Base class: ``shape``, ``dtype``, ``device``, a product counter ``matvecs`` and ``@``.

    Subclasses implement ``_matmat(V)`` for an ``(n, k)`` block and return it in float64.
    ``H @ v`` accepts a flat ``(n,)`` vector, an ``(n, k)`` block, or a list of tensors shaped like
    ``H.params``; the result has the same form (and ``v``'s dtype).
    """

    params: list[nn.Parameter]
    param_names: list[str]

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str]):
        self.params = list(params)
        self.param_names = list(names)
        self._sizes = [p.numel() for p in self.params]
        n = sum(self._sizes)
        self.shape = (n, n)
        self.dtype = self.params[0].dtype
        for p in self.params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.device = self.params[0].device
        self.matvecs = 0

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for an ``(n, k)`` block, returned in float64."""

    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat ``(n,)`` vector into views shaped like ``self.params``."""
        return [c.view_as(p) for c, p in zip(torch.split(v, self._sizes), self.params)]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like ``self.params`` into one flat vector."""
        if len(tensors) != len(self.params) or any(t.shape != p.shape for t, p in zip(tensors, self.params)):
            raise ValueError(
                f"expected {len(self.params)} tensors shaped like H.params "
                f"{[tuple(p.shape) for p in self.params]}, got {[tuple(t.shape) for t in tensors]}"
            )
        return torch.cat([t.reshape(-1) for t in tensors])

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return self.split(self @ self.flatten(v))
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"H @ v needs a tensor or a list of tensors, got {type(v).__name__}")
        n = self.shape[0]
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise ValueError(f"H @ v needs v of shape ({n},) or ({n}, k); got {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"H @ v needs a floating-point v, got {v.dtype}")
        if v.dim() == 1:
            out = self._matvec(v.to(self.device))
        else:
            out = self._matmat(v.to(self.device)) if v.shape[1] else v.new_zeros(n, 0, dtype=torch.float64)
        self.matvecs += 1 if v.dim() == 1 else v.shape[1]
        return out.to(v.dtype)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for one flat vector (operators with a cheaper single product override this)."""
        return self._matmat(v[:, None])[:, 0]

    def to_scipy(self) -> LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric)."""
        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64), device=self.device)
            return (self @ V).cpu().numpy()

        return LinearOperator(self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat,
                              dtype=np.float64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.shape[0]}, blocks={len(self.params)}, dtype={self.dtype}, "
                f"device={self.device}, matvecs={self.matvecs})")


class ModelOperator(CurvatureOperator):
    r"""An operator of a model's data-averaged loss: H = sum_b (n_b / N) H_b over batches b.

    Owns the data loop: batches are weighted by sample count; the per-batch state (a gradient
    graph) of a single batch is built once and cached; a block of k products is computed in
    lock-step (each batch's state built once per block) in chunks of at most ``max_block``
    columns; under torch.distributed each rank's data is a shard and every block is
    all-reduced once (sample-count weighted). Subclasses define ``_prepare(batch)`` and
    ``_products(state, rows)``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, data: Any, *, params: ParamSpec = None,
                 forward: ForwardFn | None = None, bn_mode: str = "eval", max_block: int = 16,
                 distributed: bool | None = None, timeout: float = 300.0):
        names, tensors = select_parameters(model, params)
        super().__init__(tensors, names)
        if not isinstance(max_block, int) or max_block < 1:
            raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
        self.model = model
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
            raise ValueError("data is empty: it yielded no batch or no samples")
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
        for name, chunk in zip(self.param_names, torch.split(out, self._sizes, dim=1)):
            if not torch.isfinite(chunk).all():
                raise FloatingPointError(
                    f"a {type(self).__name__} product is not finite in the block of parameter {name!r}; "
                    "check the model for overflow (e.g. use float64 or a smaller learning rate)"
                )


class HessianOperator(ModelOperator):
    r"""Hessian of the data-averaged loss w.r.t. (a block of) the model's parameters.

    .. math:: H = \sum_b \frac{n_b}{N} \nabla^2_\theta \ell(f_\theta(x_b), y_b)

    ``data`` is one batch ``(inputs, targets)`` or any re-iterable of batches (a DataLoader);
    batches are weighted by their sample count. On one batch the gradient graph is built once and
    reused for every product; on a dataset each batch's graph serves a whole block of products.
    Under torch.distributed (``distributed=None`` detects it) each rank holds a shard of the data.
    The model is never mutated.

    >>> H = HessianOperator(model, F.cross_entropy, (x, y))
    >>> Hv = H @ torch.randn(H.shape[0])
    >>> top = eigenvalues(H, k=5)
    """

    def _prepare(self, batch: Any) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor], float]:
        """The leaves, the indices of gradients that carry a graph, those gradients, and the loss.

        Parameters that do not reach the loss, or whose gradient is constant, have a zero Hessian block.
        """
        leaves = [p.detach().requires_grad_() for p in self.params]
        loss = self._loss(leaves, batch)
        if not loss.requires_grad:
            return leaves, [], [], float(loss.detach())
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, live, [grads[i] for i in live], float(loss.detach())

    def loss(self) -> float:
        """The sample-weighted mean loss over the data (free on one batch: its graph is cached)."""
        total, count = 0.0, 0
        for weight, state in self._states():
            total += weight * state[3]
            count += weight
        if self.distributed:
            summed = torch.tensor([total], dtype=torch.float64, device=self.device)
            count = self._all_reduce(summed, count)
            total = float(summed)
        if count == 0:
            raise ValueError("data is empty: it yielded no batch or no samples")
        return total / count

    def _products(self, state, rows: torch.Tensor) -> torch.Tensor | None:
        """All rows in one batched double backward (vmap) when the model allows it, else one at a time."""
        leaves, live, grads, _ = state
        if not live:
            return None
        k = rows.shape[0]
        if k == 1 or not self._batched_ok:
            flat = [self._flat(self._vjp(grads, leaves, self._chunks(row, grads, live)), rows) for row in rows]
            return flat[0][None] if k == 1 else torch.stack(flat)
        chunks = torch.split(rows, self._sizes, dim=1)
        vs = [chunks[i].reshape(k, *g.shape).to(g.dtype) for g, i in zip(grads, live)]
        try:
            hv = self._vjp(grads, leaves, vs, batched=True)
        except RuntimeError:
            self._batched_ok = False  # an op without a batching rule: products one at a time from now on
            return self._products(state, rows)
        return torch.cat([(h.reshape(k, -1) if h is not None else rows.new_zeros(k, p.numel()))
                          for h, p in zip(hv, self.params)], 1)

    def _chunks(self, v: torch.Tensor, grads, live) -> list[torch.Tensor]:
        """A flat vector's pieces for the parameters whose gradients carry a graph."""
        chunks = torch.split(v, self._sizes)
        return [chunks[i].view_as(g) if g.dtype == v.dtype else chunks[i].view_as(g).to(g.dtype)
                for g, i in zip(grads, live)]

    def _flat(self, hv, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.reshape(-1) if h is not None else like.new_zeros(p.numel())
                          for h, p in zip(hv, self.params)])

    @staticmethod
    def _vjp(grads, leaves, vs, batched: bool = False):
        try:
            return torch.autograd.grad(grads, leaves, vs, retain_graph=True, allow_unused=True,
                                       is_grads_batched=batched)
        except RuntimeError as err:
            reraise_explained(err, "Hessian-vector products (and GGN products)")
