"""Operators of a model's loss over data: the data loop, blocks of products, and torch.distributed."""

from __future__ import annotations

import datetime
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._utils.batches import as_batches, batch_size, empty_data_error, inputs_of, to_device
from .._utils.borrow import BorrowedLoss, ForwardFn, LossFn, ParamSpec, lacks_double_backward, select_parameters
from .._utils.random import rademacher_matrix
from .check import check as run_check
from .operator import CurvatureOperator

MAX_BLOCK_CAP = 16     # the most rows max_block=None chooses (the former fixed default)
MEMORY_SHARE = 0.25    # max_block=None fits a block's extra memory in this share of the available memory


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; None when unknown.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU on Linux: ``MemAvailable`` of
    ``/proc/meminfo``, capped by the room left under a cgroup v2 memory limit (a container's).

    Args:
        device: the device the products run on.

    Returns:
        The available bytes, or None on other devices and systems.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


def block_rows(available: int | None, row_bytes: int) -> int:
    """The rows of a block whose extra memory fits in ``MEMORY_SHARE`` of ``available``, within [1, 16].

    Args:
        available: the available bytes (None: unknown, then the cap).
        row_bytes: the memory one more row of a block costs.

    Returns:
        ``clamp(floor(MEMORY_SHARE * available / row_bytes), 1, MAX_BLOCK_CAP)``.

    >>> block_rows(8 * 2**30, 2**30), block_rows(2**30, 2**30), block_rows(None, 2**30)
    (2, 1, 16)
    """
    if available is None:
        return MAX_BLOCK_CAP
    return max(1, min(MAX_BLOCK_CAP, int(MEMORY_SHARE * available) // max(row_bytes, 1)))


def reraise_explained(err: RuntimeError, what: str):
    """Re-raise autograd's error for an operation without double backward as one that says what to do.

    Raises:
        RuntimeError: always; explained when ``err`` is about a missing double backward, else ``err`` itself.
    """
    if lacks_double_backward(err):
        raise RuntimeError(
            f"an operation in the model does not support double backward, which {what} need ({err}). "
            "Replace it with a twice-differentiable operation, or restrict params= to parameters after it."
        ) from err
    raise err


def _model_outputs(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a strided tensor: the gradients of ``nn.Embedding(sparse=True)`` weights are sparse."""
    return t if t.layout == torch.strided else t.to_dense()


def central_difference(f: Callable[[float], torch.Tensor], x_norm: float, d_norm: float, rel_step: float
                       ) -> torch.Tensor:
    """``(f(s) - f(-s)) / (2 s)``: the derivative at 0 of ``f(t) = F(x + t d)``, ``s = rel_step max(1, ||x||) / ||d||``.

    The step moves x by ``rel_step`` relative to its norm (absolute for ||x|| < 1); ``d`` must be non-zero.
    """
    s = rel_step * max(1.0, x_norm) / d_norm
    return (f(s) - f(-s)) / (2 * s)


class ModelOperator(CurvatureOperator):
    r"""An operator of a model's data-averaged loss: H = sum_b (n_b / N) H_b over batches b.

    Owns the data loop: batches are weighted by sample count; the per-batch state (a gradient
    graph) of a single batch is built once and cached; a block of k products is computed in
    lock-step (each batch's state built once per block) in chunks of at most ``max_block``
    columns; under torch.distributed each rank's data is a shard and every block is
    all-reduced once (sample-count weighted).

    A block of k >= 2 products is one batched pass (``is_grads_batched``, vmap) or k single products,
    whichever costs less per product: batching pays on small models (fewer, larger kernels) and not on
    large conv nets (where one product already fills the machine and vmapped convolutions are slower).
    With ``block_products="auto"`` the first ``BLOCK_TRIALS`` blocks of each size k are split, the first
    row alone and the others batched, both timed (elapsed time, CUDA synchronised); the least time per
    product of each way over those blocks picks the way for every later block of k rows. No product is
    computed twice, and either way gives the same products up to rounding. A model with an operation
    that vmap cannot batch gets single products from its first block on.

    Subclasses define ``_prepare(batch)``, ``_product(state, v)`` and, where a batched pass exists,
    ``_batched_products(state, rows)``; those that need the model's outputs rather than a loss set
    ``ACCEPTS_FORWARD = False`` (their borrowed call then returns the outputs, and ``loss_fn`` is
    applied by the subclass). ``_difference_quotients(batch, rows, rel_step, theta_norm)`` gives the
    first-derivative reference of :meth:`finite_differences` (and so of ``check``), and ``CHECK_HINT``
    says what a failed check means.

    Args:
        model: the model, borrowed (never mutated).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (None when ``forward`` computes the loss).
        data: one batch ``(inputs, targets)`` or a re-iterable of batches (a DataLoader).
        params: the parameters to differentiate: None (all trainable ones), names, globs or Parameters.
        forward: ``forward(model, batch) -> loss`` for batches that are not ``(inputs, targets)`` pairs.
        bn_mode: ``"eval"`` (running statistics) or ``"batch"`` (batch statistics, running ones untouched).
        max_block: the largest block of products computed in one pass over a batch. None (default):
            chosen from the available memory at first use (:attr:`max_block`).
        block_products: how a block of products is computed: ``"auto"`` (the cheaper way per block size,
            measured), ``"batched"`` (one batched double backward) or ``"loop"`` (one product at a time).
        distributed: all-reduce over torch.distributed ranks (None: when a process group is initialised).
        timeout: seconds an all-reduce may take before a dead or hung rank is reported.
        check: compare the products with finite differences of first derivatives once, at construction
            (:func:`~curvkit.hessian.check`, seed 0; its products count in ``matvecs``).

    Raises:
        TypeError: ``forward=`` given to an operator that does not accept it, or a bad loss/data type.
        ValueError: bad ``params``, ``max_block`` (neither None nor a positive integer), ``block_products`` or
            ``bn_mode`` (``"batched"`` for an operator without a batched pass), active Dropout in the model, or a
            model on the meta device (materialise it with ``to_empty`` and ``load_state_dict``); on a batch, a
            class target of a cross-entropy or NLL loss that is neither a class of the outputs nor
            ``ignore_index``.
        RuntimeError: ``distributed=True`` without an initialised process group.
        FloatingPointError: ``check=True`` and the products disagree with finite differences.
    """

    ACCEPTS_FORWARD = True
    BLOCK_PRODUCTS = ("auto", "batched", "loop")
    BLOCK_TRIALS = 2  # blocks of each size timed both ways; the first may pay one-off start-up costs
    CHECK_HINT = "an operation in the model or loss_fn is not correctly twice differentiable"

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, data: Any, *, params: ParamSpec = None,
                 forward: ForwardFn | None = None, bn_mode: str = "eval", max_block: int | None = None,
                 block_products: str = "auto", distributed: bool | None = None, timeout: float = 300.0,
                 check: bool = False):
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
        if max_block is not None and (not isinstance(max_block, int) or max_block < 1):
            raise ValueError(f"max_block must be a positive integer or None (chosen from the available memory), "
                             f"got {max_block!r}")
        if block_products not in self.BLOCK_PRODUCTS:
            raise ValueError(f"block_products must be one of {self.BLOCK_PRODUCTS}, got {block_products!r}")
        if block_products == "batched" and self._batched_products is None:
            raise ValueError(f"{type(self).__name__} has no batched pass: use block_products='auto' or 'loop'")
        self.model = model
        self.loss_fn = loss_fn
        self._max_block = max_block
        self.block_products = block_products
        self.distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        if self.distributed and not dist.is_initialized():
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first")
        self.timeout = datetime.timedelta(seconds=timeout)
        self._loss = BorrowedLoss(model, loss_fn, names, forward=forward, bn_mode=bn_mode)
        self._batches = as_batches(data)
        self._single = isinstance(self._batches, list) and len(self._batches) == 1
        self._cached: Any = None
        self._batched_ok = block_products != "loop" and self._batched_products is not None
        self._block_times: dict[int, list[tuple[float, float]]] = {}  # k -> (single, batched) s/product per trial
        if check:
            self._require_exact_products()

    def _require_exact_products(self) -> None:
        """Run :func:`~curvkit.hessian.check` once and raise if the products disagree with finite differences."""
        result = run_check(self, seed=0)
        if not result.ok:
            raise FloatingPointError(
                f"{type(self).__name__} products differ from finite differences of first derivatives by "
                f"{result.rel_error:.2g} relative (tolerance {result.tol:.2g}): {self.CHECK_HINT} (e.g. a custom "
                "autograd.Function whose backward is @once_differentiable, or treats a saved tensor as a constant). "
                "Give it a differentiable backward, or restrict params= to parameters after it."
            )

    @property
    def max_block(self) -> int:
        r"""The most product rows computed in one pass over a batch (a batched double backward).

        Given at construction, or (``max_block=None``) chosen at first use from the available memory:
        one more row of a block costs about A + 3 · 8n bytes, where A is what autograd saves for the
        backward of one forward on the first batch (measured once with saved-tensor hooks; the batched
        double backward holds about that much per row) and 8n bytes is one float64 parameter vector (the
        row, its product and their float64 copies). The block is the most rows whose cost fits in
        ``MEMORY_SHARE`` (1/4) of :func:`available_memory`, clamped to [1, ``MAX_BLOCK_CAP``] (16; the cap
        when the memory is unknown). Under torch.distributed the ranks agree on their smallest choice.

        Returns:
            The block size in rows.
        """
        if self._max_block is None:
            rows = block_rows(available_memory(self.device), self._activation_bytes() + 3 * 8 * self.shape[0])
            if self.distributed:
                agreed = torch.tensor([rows], device=self.device)
                self._wait(dist.all_reduce(agreed, op=dist.ReduceOp.MIN, async_op=True))
                rows = int(agreed)
            self._max_block = rows
        return self._max_block

    def _activation_bytes(self) -> int:
        """Bytes autograd saves for the backward of one forward on the first batch (0 without data).

        The forward is the borrowed loss, or the model's outputs for operators that take no ``forward=``.
        """
        batch = next(iter(self._batches), None)
        if batch is None:
            return 0
        if not self.ACCEPTS_FORWARD:
            batch = inputs_of(batch)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        leaves = [p.detach().requires_grad_() for p in self.params]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._loss.evaluate(leaves, to_device(batch, self.device))
        return saved

    @property
    def single_batch(self) -> bool:
        """True when one cached per-batch state serves every product (blocks then save nothing)."""
        return self._single

    @property
    def stratified(self) -> bool:
        """True when the data has more than one batch (or rank), so :meth:`stratified_samples` applies."""
        return not self._single or self.distributed

    def stratified_samples(self, k: int, gen: torch.Generator) -> torch.Tensor:
        r"""``k`` independent Hutchinson samples :math:`z \odot H z` with a probe of their own for every batch.

        With batch weights :math:`w_b = n_b / N` (over every rank's batches) and independent Rademacher
        probes :math:`z_{b,i}`, sample i is

        .. math:: s_i = \sum_b w_b\, z_{b,i} \odot H_b z_{b,i}, \qquad E[s_i] = \operatorname{diag} H,

        and its sum :math:`t_i = \sum_b w_b z_{b,i}^\top H_b z_{b,i}` estimates tr(H) with
        :math:`\operatorname{Var} t_i = \sum_b w_b^2 \operatorname{Var}(z^\top H_b z)`, against
        :math:`\operatorname{Var}(z^\top H z)` when one probe serves every batch (likewise entry by entry for
        the diagonal). Where the batches' Hessians agree, that is about 1/B of it for B equal batches; it can be
        larger only when the batches' Hessians differ from their mean by more than B - 1 times its squared
        Frobenius norm (tiny batches). A block of ``k`` costs one pass over the data, like ``H @ Z`` with k columns.
        The probes come from a generator seeded by one draw from ``gen`` plus the rank, so ``gen`` advances
        identically on every rank and the ranks' probes differ.

        Args:
            k: the number of samples.
            gen: the generator the seed is drawn from.

        Returns:
            An ``(n, k)`` float64 tensor on the operator's device, identical on every rank.

        Raises:
            FloatingPointError: a sample is not finite (naming the parameter).
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        local = torch.Generator(device=gen.device)
        local.manual_seed(seed + (dist.get_rank() if self.distributed else 0))
        n = self.shape[0]
        blocks = []
        for start in range(0, k, self.max_block):
            rows = min(self.max_block, k - start)

            def forms(rows=rows):
                for weight, state in self._states():
                    Z = rademacher_matrix(rows, n, local, self.device)  # one probe per row
                    block = self._products(state, Z.to(self.dtype))
                    yield weight, None if block is None else block.double() * Z

            blocks.append(self._weighted_mean(torch.Size([rows, n]), forms()))
        out = torch.cat(blocks)
        self._check_finite(out)
        return out.T

    def loss(self) -> float:
        """The sample-weighted mean loss over the data (free on one batch: its state is cached).

        Every per-batch state of a subclass carries its batch's ``loss``.
        """
        total, count = 0.0, 0
        for weight, state in self._states():
            total += weight * state.loss
            count += weight
        if self.distributed:
            summed = torch.tensor([total], dtype=torch.float64, device=self.device)
            count = self._all_reduce(summed, count)
            total = float(summed)
        if count == 0:
            raise empty_data_error()
        return total / count

    @abstractmethod
    def _prepare(self, batch: Any) -> Any:
        """Per-batch state reused by every product on that batch (e.g. the gradient graph)."""

    @abstractmethod
    def _product(self, state: Any, v: torch.Tensor) -> torch.Tensor | None:
        """The product with one flat vector ``v`` (n,) on one batch, in ``v``'s dtype (None if identically zero)."""

    _batched_products: Callable[[Any, torch.Tensor], torch.Tensor | None] | None = None
    """Optional: the products with all rows of ``rows`` (k, n) on one batch in one batched pass, as (k, n)."""

    def _products(self, state: Any, rows: torch.Tensor) -> torch.Tensor | None:
        """Products with the rows of ``rows`` (k, n) on one batch, as (k, n) (None if identically zero).

        Batched or one row at a time as chosen for k (see the class docstring); while the choice is measured,
        the first row alone and the others batched.
        """
        k = rows.shape[0]
        way = self._block_way(k)
        if way == "batched":
            return self._batched(state, rows)
        if way == "loop":
            out = [self._product(state, v) for v in rows]
            return None if out[0] is None else torch.stack(out)
        start = self._clock()
        first = self._product(state, rows[0])
        if first is None:
            return None
        middle = self._clock()
        rest = self._batched(state, rows[1:])
        if self._batched_ok:  # else vmap could not batch the model, and rest came one row at a time
            self._block_times.setdefault(k, []).append((middle - start, (self._clock() - middle) / (k - 1)))
        return torch.cat([first[None], rest])

    def _block_way(self, k: int) -> str:
        """``"loop"``, ``"batched"``, or ``"measure"`` while blocks of k rows are still being timed."""
        if k == 1 or not self._batched_ok:
            return "loop"
        if self.block_products != "auto":
            return self.block_products
        times = self._block_times.get(k, [])
        if len(times) < self.BLOCK_TRIALS:
            return "measure"
        single, batched = map(min, zip(*times))
        return "batched" if batched < single else "loop"

    def _batched(self, state: Any, rows: torch.Tensor) -> torch.Tensor | None:
        """``_batched_products``, or one row at a time from now on where vmap cannot batch the model."""
        try:
            return self._batched_products(state, rows)
        except RuntimeError:  # an op without a batching rule; a genuine error recurs one row at a time
            self._batched_ok = False
            return self._products(state, rows)

    def _clock(self) -> float:
        """Elapsed seconds, after the device's queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _difference_quotients(self, batch: Any, rows: torch.Tensor, rel_step: float, theta_norm: float
                              ) -> torch.Tensor:
        """Central-difference approximations of the products with ``rows`` (k, n) on one batch, as (k, n).

        Raises:
            TypeError: the subclass defines no finite-difference reference, so ``check`` cannot run on it.
        """
        raise TypeError(f"{type(self).__name__} does not define _difference_quotients, so it cannot be "
                        "checked against finite differences; define it (see HessianOperator)")

    def finite_differences(self, V: torch.Tensor, rel_step: float) -> torch.Tensor:
        r"""Approximations of the products with the columns of ``V`` from first derivatives only.

        Each is a central difference (:func:`central_difference`) along the column from the parameters
        :math:`\theta` with step :math:`s = \mathrm{rel\_step} \max(1, \lVert\theta\rVert) / \lVert v \rVert`;
        what is differenced depends on the operator (the loss gradient for :class:`HessianOperator`; the
        outputs, then the loss gradient w.r.t. them, for :class:`GGNOperator`). The error is :math:`O(s^2)`
        from truncation plus :math:`O(\epsilon / s)` from rounding.
        Averaged over the data (and ranks) like the products; the reference of :func:`~curvkit.hessian.check`.
        The padding rows of embeddings (``padding_idx``), which get no gradient and so no curvature in the
        products, are left out of the directions.

        Args:
            V: an ``(n, k)`` block of directions.
            rel_step: the relative step; :math:`\epsilon^{1/3}` balances truncation and rounding errors.

        Returns:
            The ``(n, k)`` float64 approximations of ``H @ V``.
        """
        n = self.shape[0]
        if V.dim() != 2 or V.shape[0] != n:
            raise ValueError(f"V must have shape ({n}, k), got {tuple(V.shape)}")
        rows = self._without_padding_rows(V.T.to(device=self.device, dtype=self.dtype))
        theta_norm = float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1).double() for p in self.params])))
        quotients = ((batch_size(batch), self._difference_quotients(to_device(batch, self.device), rows, rel_step,
                                                                    theta_norm))
                     for batch in self._batches)
        return self._weighted_mean(rows.shape, quotients).T

    def _without_padding_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (k, n) with the coordinates of embedding padding rows zeroed.

        autograd gives the ``padding_idx`` row of an ``nn.Embedding``/``nn.EmbeddingBag`` no gradient, so
        the products treat it as frozen (its rows and columns of H are zero); a finite difference that
        moved it would measure curvature the products leave out on purpose.
        """
        starts = dict(zip(map(id, self.params), self.offsets))
        rows = rows.clone()
        for module in self.model.modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.padding_idx is not None \
                    and id(module.weight) in starts:
                start = starts[id(module.weight)] + module.padding_idx * module.embedding_dim
                rows[:, start:start + module.embedding_dim] = 0
        return rows

    def _flat(self, tensors: Any, like: torch.Tensor) -> torch.Tensor:
        """Tensors shaped like ``self.params`` (None: a zero block) as one vector, in ``like``'s dtype.

        The vector is (n,), or rows (k, n) when the tensors and ``like`` carry a leading batch dimension k.
        """
        lead = like.shape[:-1]
        return torch.cat([dense(t).reshape(*lead, -1) if t is not None else like.new_zeros(*lead, p.numel())
                          for t, p in zip(tensors, self.params)], -1).to(like.dtype)

    def _shifted(self, pieces: list[torch.Tensor], t: float) -> list[torch.Tensor]:
        """Private leaves at the parameters plus ``t`` times ``pieces`` (a direction split like ``self.params``)."""
        return [(p.detach() + t * c.to(p.dtype)).requires_grad_() for p, c in zip(self.params, pieces)]

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
        out = self._product(self._single_state(), v.to(self.dtype))
        if out is None:
            return v.new_zeros(v.shape, dtype=self.dtype)
        self._check_finite(out)
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        rows = V.new_empty(V.shape[::-1], dtype=self.dtype).copy_(V.T)  # cast and transpose in one pass
        step = self.max_block if rows.shape[0] > 1 else 1   # single products never need the block size
        blocks = [self._block(rows[i:i + step]) for i in range(0, rows.shape[0], step)]
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        self._check_finite(out)
        return out.T

    def _block(self, rows: torch.Tensor) -> torch.Tensor:
        """Sample-weighted mean over batches (and ranks) of the products with ``rows`` (k, n)."""
        return self._weighted_mean(rows.shape, ((weight, self._products(state, rows))
                                                for weight, state in self._states()))

    def _weighted_mean(self, shape: torch.Size, weighted: Iterable[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """The sample-weighted mean over batches (and ranks) of ``(n_b, block_b)`` pairs (None: a zero block).

        Returns:
            The float64 mean; on one batch without torch.distributed, the batch's block itself.
        """
        out, total = None, 0
        for weight, block in weighted:
            total += weight
            if block is None:
                continue
            block = block.to(torch.float64)
            if self._single and not self.distributed:
                return block
            out = block.mul_(weight) if out is None else out.add_(block, alpha=weight)
        if out is None:
            out = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if self.distributed:
            total = self._all_reduce(out, total)
        if total == 0:
            raise empty_data_error()
        return out.div_(total)

    def _all_reduce(self, out: torch.Tensor, total: int) -> int:
        """Sum ``out`` and the sample count over ranks in one all-reduce; a dead or hung rank times out."""
        buf = torch.cat([out.reshape(-1), out.new_tensor([float(total)])])
        self._wait(dist.all_reduce(buf, async_op=True))
        out.copy_(buf[:-1].view_as(out))
        return int(round(float(buf[-1])))

    def _wait(self, work: Any) -> None:
        """Wait for an asynchronous collective; a dead or hung rank raises after ``timeout``."""
        try:
            finished = work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise RuntimeError(f"a torch.distributed all-reduce did not finish within {self.timeout}: "
                               f"a rank died, hangs, or runs a different number of products ({err})") from err
        if finished is False:
            raise RuntimeError(f"a torch.distributed all-reduce did not finish within {self.timeout}")

    def _check_finite(self, out: torch.Tensor) -> None:
        """Raise FloatingPointError naming the first parameter whose block of ``out`` (n,) or (k, n) is not finite."""
        if math.isfinite(out.sum()):  # one reduction: any nan/inf makes the sum non-finite
            return
        for name, chunk in zip(self.param_names, out.split_with_sizes(self.sizes, dim=-1)):
            if not torch.isfinite(chunk).all():
                raise FloatingPointError(
                    f"a {type(self).__name__} product is not finite in the block of parameter {name!r}; "
                    "check the model for overflow (e.g. use float64 or a smaller learning rate)"
                )


