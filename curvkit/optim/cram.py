r"""CrAM and CrAM+: compression-aware training around any first-order torch optimizer.

CrAM (Peste et al., "CrAM: A Compression-Aware Minimizer", ICLR 2023) takes a sharpness-aware step
at the *compressed* perturbed point, so that the trained dense model keeps its accuracy when it is
pruned in one shot afterwards, to whichever sparsity is needed. One step on a batch with loss L:

1. g = ∇L(θ) (BatchNorm running statistics update as in any training step);
2. θ' = θ + ρ g (``normalize=True``: θ + ρ g / ‖g‖, SAM's perturbation; ‖g‖ over all parameters);
3. a compression C is drawn with the optimizer's own generator (a sparsity s uniformly from
   ``sparsities``, CrAM-Multi; or 2:4 / 4:8 with probability 1/2 each for ``"nm"``) and its mask M
   is computed at θ' (:mod:`curvkit.compress.masks`);
4. g_c = ∇L(M ⊙ θ') on the same batch, BatchNorm running statistics frozen (with ``model=``);
5. θ is restored and the base optimizer steps along d = M ⊙ g_c (``sparse_grad=True``) or g_c,
   plus g for CrAM+ (``plus=True``): d is written to ``.grad`` and the base step is called.

CrAM+ sums two gradients, so its steps are about twice as long as the base optimizer's on the
same learning rate; compare against the base at 2x lr too. A step costs two forward and backward
passes plus the mask (one k-th value over the weights' magnitudes).

**What is compressed.** Every trainable parameter with more than one dimension (Linear, conv,
embedding weights) in parameter groups with ``compress=True`` (the default): the same set
:func:`curvkit.compress.prune_weights` prunes. Biases and normalisation scales are perturbed but
never masked. A group ``{"params": ..., "compress": False}`` keeps its weights dense, e.g. a first
convolution whose input channels are not a multiple of M under N:M. ``rho`` may differ per group.

**BatchNorm.** With ``model=`` every ``_BatchNorm`` in it (BatchNorm1d/2d/3d, SyncBatchNorm,
lazy variants) stops tracking running statistics during the compressed pass: it normalises with
the batch statistics as in training, and its ``running_mean``, ``running_var`` and
``num_batches_tracked`` are left exactly as the first pass left them. Without ``model=`` CrAM
cannot find them, and the compressed pass updates them a second time with statistics of the
sparse network, which is not the network that is evaluated.

**Distributed.** The compression is drawn from a generator seeded identically on every rank (an
int seed, or rank 0's entropy broadcast for ``seed=None``), so all ranks use the same masks. With
plain replicas (one model per rank, each fed its shard), both gradients are averaged over ranks
with one all-reduce each. With a ``DistributedDataParallel`` model passed as ``model=``, DDP's
backward averages them and CrAM adds no communication (``distributed=None`` decides this; pass
``distributed=False`` if a DDP model is not given as ``model=``: otherwise its gradients are
averaged a second time, which changes nothing but rounding and costs an all-reduce).

**Hooks and state.** ``param_groups`` and ``state`` are the base optimizer's (LR schedulers and
``zero_grad`` act on both); ``state_dict()`` holds the base state and the generator, so a resumed
run is bit-identical whatever the global RNG does. Step hooks registered on CrAM, or globally,
run once per CrAM step; the base optimizer's step runs without hooks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._utils.distributed import average_over_ranks
from .._utils.random import Seed, make_generator
from ..compress.masks import magnitude_masks, nm_masks, parse_nm
from ._resume import require_same_settings
from .stability import stability

Compression = Union[str, Callable[[list[torch.Tensor], float], Sequence[torch.Tensor]]]
_NORM_EPS = 1e-12  # added to ||g|| under normalize=True, as in SAM


class CrAM(torch.optim.Optimizer):
    r"""Compression-aware minimizer (CrAM, CrAM+, CrAM-Multi) wrapping a base optimizer.

    Args:
        params: parameters or parameter groups, as for any torch optimizer; groups may set ``rho``
            and ``compress`` (default True) besides the base optimizer's settings.
        base_optimizer: the optimizer class that takes the step, built as
            ``base_optimizer(params, **base_kwargs)``; its ``step()`` is called without a closure.
        rho: the perturbation radius ρ >= 0 (0.05 on ImageNet and 0.2 on CIFAR-10 in the paper).
        sparsities: sparsities s in [0, 1) drawn uniformly at each step (default ``(0.5,)``); not
            for N:M compressions, whose sparsity is 1 - N/M.
        compression: ``"topk"`` (global magnitude top-k over the compressed weights),
            ``"layer_topk"`` (the same fraction of each weight), an N:M pattern such as ``"2:4"`` or
            ``"4:8"`` (groups along the input dimension), ``"nm"`` (2:4 or 4:8, drawn), or a callable
            ``(weights, s) -> masks`` returning one 0/1 or bool tensor per weight.
        plus: CrAM+: add the dense gradient g to the update direction.
        sparse_grad: multiply the compressed gradient by the mask.
        normalize: perturb by ρ g / ‖g‖ instead of ρ g.
        model: the model, so BatchNorm statistics stay untouched by the compressed pass and errors
            name parameters; a ``DistributedDataParallel`` model also averages the gradients.
        seed: seeds the optimizer's generator (None: fresh entropy, shared by all ranks).
        distributed: average both gradients over torch.distributed ranks with one all-reduce each;
            None: when a process group is initialised, unless ``model`` is DDP-wrapped.
        **base_kwargs: the base optimizer's settings (``lr``, ``momentum``, ...).

    Raises:
        ValueError: for rho < 0, a sparsity outside [0, 1), sparsities with an N:M compression, an
            unknown compression, no weight to compress, or a compressed weight whose input dimension
            is not a multiple of M under N:M (named when ``model`` is given).
        TypeError: if ``base_optimizer`` is not a ``torch.optim.Optimizer`` subclass.

    Example:
        .. code-block:: python

            opt = CrAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05,
                       sparsities=(0.5, 0.7, 0.9), model=model, seed=0)
            loss = opt.step(lambda: F.cross_entropy(model(x), y))   # no backward in the closure
            sparse = recalibrate_bn(prune_weights(model, amount=0.9), loader, max_batches=20)
    """

    def __init__(self, params: Iterable[Any], base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, *,
                 rho: float = 0.05, sparsities: float | Sequence[float] | None = None,
                 compression: Compression = "topk", plus: bool = True, sparse_grad: bool = True,
                 normalize: bool = False, model: nn.Module | None = None, seed: Seed = None,
                 distributed: bool | None = None, **base_kwargs: Any):
        _check_rho(rho)
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD (CrAM "
                            f"builds it on the parameters with **base_kwargs), got {base_optimizer!r}")
        self.compression = compression
        self._choices = _compression_choices(compression, sparsities)
        self.plus, self.sparse_grad, self.normalize = plus, sparse_grad, normalize
        self.model = model
        self._names = {} if model is None else {id(p): name for name, p in model.named_parameters()}
        self.base_optimizer = base_optimizer(params, **base_kwargs)
        super().__init__(self.base_optimizer.param_groups, {**self.base_optimizer.defaults, "rho": rho,
                                                           "compress": True})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if not _compressed(self.param_groups):
            raise ValueError("CrAM compresses parameters with more than one dimension in groups with compress=True, "
                             "and there are none: use the base optimizer alone")
        shared = dist.is_available() and dist.is_initialized()
        ddp = isinstance(model, DistributedDataParallel)
        self.distributed = shared and not ddp if distributed is None else distributed
        self._copy_first_gradient = shared  # DDP may hand out its buckets as .grad (gradient_as_bucket_view)
        self._generator = make_generator(seed, shared=shared)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (and so to CrAM), with CrAM's ``rho`` and ``compress`` defaults."""
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("compress", True)
        _check_rho(param_group["rho"])
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
        for choice in self._choices:
            if isinstance(choice, str):
                self._nm(_compressed([param_group]), choice)

    def _settings(self) -> dict[str, Any]:
        compression = self.compression if isinstance(self.compression, str) else "callable"
        return {"sparsities": [c if isinstance(c, str) else float(c) for c in self._choices],
                "compression": compression, "plus": self.plus, "sparse_grad": self.sparse_grad,
                "normalize": self.normalize}

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and groups, and CrAM's generator and settings (under ``"cram"``)."""
        state = super().state_dict()
        state["cram"] = {"generator": self._generator.get_state(), "settings": self._settings()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, into CrAM and its base optimizer alike.

        Raises:
            ValueError: the state was saved with other sparsities, compression or direction settings
                (resuming would silently change what is trained for).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("cram", None)
        require_same_settings((extra or {}).get("settings"), self._settings(), "CrAM")
        super().load_state_dict(state_dict)
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        if extra is not None:
            self._generator.set_state(extra["generator"])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One CrAM step on the batch the closure evaluates.

        Args:
            closure: returns the loss (a scalar tensor with a graph) without calling backward; it is called
                twice, at θ and at the compressed point. A closure may instead run backward itself and return
                the loss detached, as training frameworks' closures do (PyTorch Lightning's).

        Returns:
            The loss at θ, detached.

        Raises:
            TypeError: without a closure.
            RuntimeError: if the closure called backward itself and returned the loss with its graph.
            ValueError: if the closure's loss is not a scalar that requires grad, or a callable
                compression returned masks of the wrong number or shapes.
        """
        if closure is None:
            raise TypeError("CrAM.step needs a closure that returns the loss: opt.step(lambda: loss_fn(model(x), y))")
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        loss, grads = self._gradient(closure, params, copy=self._copy_first_gradient)
        theta = [p.detach().clone() for p in params]
        try:
            self._perturb(grads)
            weights = _compressed(self.param_groups)
            masks = self._masks(weights)
            torch._foreach_mul_(weights, masks)
            with self._running_statistics_frozen():
                _, compressed_grads = self._gradient(closure, params, copy=False)
        finally:
            for p, saved in zip(params, theta):
                p.copy_(saved)
        mask_of = {id(w): m for w, m in zip(weights, masks)}
        for p, g, g_c in zip(params, grads, compressed_grads):
            if g_c is not None and self.sparse_grad and id(p) in mask_of:
                g_c.mul_(mask_of[id(p)])
            if self.plus and g is not None:
                g_c = g if g_c is None else g_c.add_(g)
            p.grad = g_c
        _unhooked_step(self.base_optimizer)
        return loss

    def _gradient(self, closure: Callable[[], torch.Tensor], params: list[torch.Tensor],
                  copy: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The closure's loss and its gradient (None for parameters it does not reach), averaged over ranks."""
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
            if any(p.grad is not None for p in params):   # the closure ran backward itself
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    raise RuntimeError(
                        "the closure called backward and returned the loss with its graph. CrAM differentiates "
                        "twice per step itself: return the loss without calling backward, "
                        "opt.step(lambda: loss_fn(model(x), y)); a closure that runs backward itself (as training "
                        "frameworks' do) must return the loss detached")
            elif not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError("the closure must return the loss as a scalar tensor that requires grad "
                                 f"(and must not call backward itself); got {type(loss).__name__}"
                                 f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}")
            else:
                torch.autograd.backward(loss, inputs=params)
        grads = [None if p.grad is None else p.grad.clone() if copy else p.grad for p in params]
        for p in params:
            p.grad = None
        if self.distributed:
            average_over_ranks([g for g in grads if g is not None])
        return (None if loss is None else loss.detach()), grads

    # ------------------------------------------------------------------ analysis
    def next_step_needs_graph(self) -> bool:
        """False: CrAM takes first derivatives only, so a backward for it never needs ``create_graph``."""
        return False

    def preconditioner(self, params: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """The base optimizer's diagonal preconditioner (None for SGD), see :mod:`curvkit.optim.stability`.

        Args:
            params: the parameters to report, in order (default: every parameter of every group).

        Returns:
            P over ``params`` in float64, or None.
        """
        params = [p for g in self.param_groups for p in g["params"]] if params is None else params
        return stability(self.base_optimizer, params)[1]

    def stability_threshold(self) -> float:
        """The base optimizer's stability threshold (nan where none is known).

        CrAM+ steps along g_c + g, about twice the gradient near a flat compressed point, so its effective
        step is up to twice the base optimizer's: compare sharpness with half this threshold there.
        """
        return stability(self.base_optimizer, [])[0]

    def _perturb(self, grads: list[torch.Tensor | None]) -> None:
        """θ += ρ g per group (ρ g / ‖g‖ with ``normalize``, the norm over all parameters)."""
        scale = 1.0
        if self.normalize:
            norms = torch._foreach_norm([g for g in grads if g is not None])
            scale = 1.0 / (float(torch.linalg.vector_norm(torch.stack(norms))) + _NORM_EPS) if norms else 1.0
        grad_of = iter(grads)
        for group in self.param_groups:
            pairs = [(p, next(grad_of)) for p in group["params"] if p.requires_grad]
            pairs = [(p, g) for p, g in pairs if g is not None]
            if pairs and group["rho"]:
                torch._foreach_add_([p for p, _ in pairs], [g for _, g in pairs], alpha=group["rho"] * scale)

    def _masks(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Draw this step's compression and return its masks of ``weights`` (at the perturbed point)."""
        choice = self._choices[int(torch.randint(len(self._choices), (1,), generator=self._generator))]
        if isinstance(choice, str):
            return self._nm(weights, choice)
        if callable(self.compression):
            masks = list(self.compression([w.detach() for w in weights], choice))
            if len(masks) != len(weights) or any(m.shape != w.shape for m, w in zip(masks, weights)):
                raise ValueError(f"the compression callable must return one mask per weight with the weight's shape "
                                 f"{[tuple(w.shape) for w in weights]}; got {[tuple(m.shape) for m in masks]}")
            return masks
        return magnitude_masks(weights, choice, per_tensor=self.compression == "layer_topk")

    def _nm(self, weights: list[torch.Tensor], pattern: str) -> list[torch.Tensor]:
        names = [self._names.get(id(w), "a parameter of the optimizer") for w in weights]
        try:
            return nm_masks(weights, pattern, names)
        except ValueError as err:
            raise ValueError(f"{err} CrAM: put it in a parameter group with compress=False, e.g. "
                             "CrAM([{'params': [first.weight], 'compress': False}, {'params': rest}], ...)") from None

    def _running_statistics_frozen(self) -> contextlib.AbstractContextManager:
        """BatchNorm layers of ``model`` normalise with batch statistics but leave their running ones alone."""
        if self.model is None:
            return contextlib.nullcontext()
        return _not_tracking([m for m in self.model.modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats])


def _compressed(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The parameters CrAM masks: trainable, more than one dimension, in groups with ``compress=True``."""
    return [p for group in groups if group["compress"] for p in group["params"] if p.requires_grad and p.dim() > 1]


@contextlib.contextmanager
def _not_tracking(norms: list[nn.Module]):
    """``track_running_stats=False`` for the duration of the block.

    In train mode _BatchNorm then passes no running buffers to the kernel (nothing is updated,
    ``num_batches_tracked`` included); in eval mode it still uses them.
    """
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _unhooked_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` without the step-hook wrapper torch puts around it.

    Global step hooks then see the wrapping CrAM step only.
    """
    step = type(optimizer).step
    if getattr(step, "hooked", False):
        step = getattr(step, "__wrapped__", step)
    step(optimizer)


def _check_rho(rho: Any) -> None:
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0 (the perturbation radius), got {rho!r}")


def _compression_choices(compression: Compression, sparsities: float | Sequence[float] | None) -> tuple:
    """What a step draws from: sparsities for top-k and callables, N:M patterns otherwise."""
    if callable(compression) or compression in ("topk", "layer_topk"):
        choices = (0.5,) if sparsities is None else (
            (sparsities,) if isinstance(sparsities, (int, float)) else tuple(sparsities))
        if not choices or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1
                                  for s in choices):
            raise ValueError(f"sparsities must be fractions in [0, 1), such as (0.5, 0.7, 0.9); got {sparsities!r}")
        return choices
    if compression == "nm":
        choices = ("2:4", "4:8")
    elif isinstance(compression, str) and ":" in compression:
        parse_nm(compression)
        choices = (compression,)
    else:
        raise ValueError(f"compression must be 'topk', 'layer_topk', 'nm', an N:M pattern such as '2:4' or '4:8', "
                         f"or a callable(weights, sparsity) -> masks; got {compression!r}")
    if sparsities is not None:
        raise ValueError(f"compression {compression!r} keeps N of every M weights (sparsity 1 - N/M); sparsities "
                         "applies to top-k and callable compressions only: leave it unset")
    return choices
