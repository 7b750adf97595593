"""The diagonal-curvature optimizer base: a gradient every step, a diagonal estimate every ``update_each`` steps.

A step gets its gradient either from a closure (the optimizer calls ``torch.autograd.grad``
itself, with ``create_graph`` only on curvature steps) or from ``.grad`` left by
``loss.backward(create_graph=True)``. A closure that runs backward itself and returns the loss
detached, as training frameworks' closures do (PyTorch Lightning's), is recognised by the ``.grad``
it changed and read like the second form. Either way ``.grad`` ends graph-free, so no parameter <->
gradient reference cycle survives the step. The closure's forward runs with PyTorch's
twice-differentiable attention kernel selected (the fused ones have no double backward).

Hutchinson probes are Rademacher vectors from Philox4x32-10 keyed by (probe seed, probe offset)
(:mod:`curvkit.kernels`): the seed is the optimizer's ``seed`` (a Generator's initial seed; fresh
entropy, shared by all ranks, for None), the offset counts draws, and both are saved in
``state_dict()``. The fused kernels and the PyTorch path draw the same probes, so ``fused=True``
and ``fused=False`` follow the same trajectory (to rounding). GNB and callable estimators draw
from the optimizer's torch.Generator.

With one parameter group, the update of a step before a Hutchinson refresh also writes the next
draw into that step's probe buffers (one native call instead of two); the buffers are kept until
the refresh, so between such steps the optimizer holds one parameter-sized tensor more than its
state. The draw is the one that would be made on time, bit for bit.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import kernels
from .._utils.borrow import lacks_double_backward, twice_differentiable
from .._utils.distributed import average_over_ranks
from .._utils.random import make_generator
from ._resume import require_same_settings
from ._step_hooks import with_torch_step_hooks
from .estimators import Curvature, EstimateContext, Estimator, make_estimator

FUSED_DOC = """``fused``: None runs the update of a parameter group as one call of curvkit's compiled kernel where
    it is built and verified (CPU), True requires the kernel (RuntimeError where it cannot run; a warning on
    CUDA, where the kernels are not yet verified), False runs torch's foreach ops. Both paths draw the same
    Philox probes and agree to rounding. ``fused`` is a per-group setting (in ``param_groups``)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_group(lr, betas, weight_decay, fused) -> None:
    """Clear errors for the per-group hyperparameters every curvature optimizer shares.

    Raises:
        ValueError: a hyperparameter out of range, with what it must be.
    """
    _require(isinstance(lr, (int, float)) and lr >= 0, f"lr must be a non-negative number, got {lr!r}")
    _require(isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
             f"betas must be two numbers in [0, 1), got {betas!r}")
    _require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}")
    _require(fused is None or isinstance(fused, bool),
             f"fused must be None (compiled kernels where available), True (require them) or False, got {fused!r}")


def validate_common(lr, betas, weight_decay, update_each, n_samples, fused) -> None:
    """Clear errors for the hyperparameters every curvature optimizer shares: per group, and the schedule.

    Raises:
        ValueError: a hyperparameter out of range, with what it must be.
    """
    validate_group(lr, betas, weight_decay, fused)
    _require(isinstance(update_each, int) and update_each >= 1,
             f"update_each must be a positive integer (curvature refreshed every that many steps), got {update_each!r}")
    _require(isinstance(n_samples, int) and n_samples >= 1,
             f"n_samples must be a positive integer, got {n_samples!r}")


def _drop_unused(params: list[torch.Tensor], grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that received a gradient, and their gradients."""
    if all(g is not None for g in grads):
        return params, list(grads)
    kept = [(p, g) for p, g in zip(params, grads) if g is not None]
    return [p for p, _ in kept], [g for _, g in kept]


def _grad_marks(params: list[torch.Tensor]) -> list:
    """What identifies each parameter's ``.grad`` now: a weak reference and its version (None without one)."""
    return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]


def _grads_changed(params: list[torch.Tensor], marks: list) -> bool:
    """Whether a backward ran since ``marks``: some ``.grad`` was set, replaced, cleared or accumulated into."""
    for p, mark in zip(params, marks):
        if mark is None:
            if p.grad is not None:
                return True
        elif p.grad is None or mark[0]() is not p.grad or mark[1] != p.grad._version:
            return True
    return False


class DiagonalCurvatureOptimizer(torch.optim.Optimizer, ABC):
    """Base of AdaHessian and Sophia: one gradient per step and, every ``update_each`` steps, a diagonal estimate.

    Subclasses implement ``_update(group, params, grads, curvature, next_probes)`` with ``curvature`` a
    :class:`~curvkit.optim.estimators.Curvature` (or None on steps that do not refresh it), and
    ``_preconditioner(group, state)`` / ``stability_threshold()`` for :mod:`curvkit.analysis`.
    The optimizer-wide settings ``update_each``, ``n_samples`` and the estimator's name are saved in
    ``state_dict()`` and must match on ``load_state_dict``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        defaults: the per-group hyperparameters (``fused`` among them).
        update_each: refresh the curvature every that many steps.
        n_samples: Hutchinson probes per refresh.
        estimator: a name in :data:`curvkit.optim.estimators.ESTIMATORS` or a callable.
        seed: an int, a ``torch.Generator`` or None (fresh entropy, shared by all ranks).
        distributed: average gradients and curvature over torch.distributed ranks (None: when initialised).
    """

    def __init__(self, params, defaults: dict, *, update_each: int, n_samples: int, estimator: Estimator,
                 seed: Any, distributed: bool | None):
        self.estimator = estimator
        self._estimator = make_estimator(estimator)
        super().__init__(params, defaults)
        self.update_each = update_each
        self.n_samples = n_samples
        self.distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        self._generator = make_generator(seed, shared=self.distributed)
        self._probe_seed = self._generator.initial_seed()
        self._probe_offset = 0
        self._prefetched = None  # (offset, params, probes): a draw that the last update made in advance
        self._steps = 0

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, checking its shared hyperparameters and ``fused``.

        Raises:
            ValueError: a hyperparameter out of range, or ``fused`` not None/True/False.
            RuntimeError: ``fused=True`` where the compiled kernels cannot run.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group["lr"], group["betas"], group["weight_decay"], group["fused"])
        if group["fused"]:
            for device in {p.device for p in group["params"]}:
                kernels.use_kernels(device, fused=True)

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict:
        return {"update_each": self.update_each, "n_samples": self.n_samples, "estimator": self._estimator.name}

    def state_dict(self) -> dict:
        """Torch's state dict plus a ``"curvkit"`` entry: step count, generator, probe stream and settings."""
        state = super().state_dict()
        state["curvkit"] = {"steps": self._steps, "generator": self._generator.get_state(),
                            "probe_seed": self._probe_seed, "probe_offset": self._probe_offset,
                            "settings": self._settings()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by the same optimizer class with the same optimizer-wide settings.

        Raises:
            ValueError: the saved ``update_each``, ``n_samples`` or estimator differ from this optimizer's
                (resuming would silently change the curvature schedule).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvkit", None)
        require_same_settings((extra or {}).get("settings"), self._settings(), type(self).__name__)
        super().load_state_dict(state_dict)
        self._prefetched = None
        if extra is not None:
            self._steps = extra["steps"]
            self._generator.set_state(extra["generator"])
            self._probe_seed = extra.get("probe_seed", self._probe_seed)
            self._probe_offset = extra.get("probe_offset", self._probe_offset)

    # ------------------------------------------------------------------ analysis
    def preconditioner(self, params: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """The diagonal preconditioner P of the update theta -= lr * m / P, flat in float64.

        Args:
            params: the parameters to report, in this order (default: every parameter of every group).

        Returns:
            P over ``params``, or None until every one of them has optimizer state.

        Raises:
            ValueError: a parameter in ``params`` is not optimized by this optimizer.
        """
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"]] if params is None else list(params)
        missing = [tuple(p.shape) for p in params if id(p) not in group_of]
        if missing:
            raise ValueError(f"parameters of shapes {missing} are not optimized by this {type(self).__name__}")
        if not params or not all(self.state.get(p) for p in params):
            return None
        return torch.cat([self._preconditioner(group_of[id(p)], self.state[p]).reshape(-1).to(torch.float64)
                          for p in params])

    @abstractmethod
    def _preconditioner(self, group: dict, state: dict) -> torch.Tensor:
        """P of one parameter from its group and state."""

    def stability_threshold(self) -> float:
        """The largest eigenvalue of P^-1 H at which the update is still stable: (2 + 2 b1) / ((1 - b1) lr).

        The step is lr * m / P with m an EMA of the gradient (factor b1 of the first group), which on a
        quadratic is stable while lr * lambda(P^-1 H) < (2 + 2 b1) / (1 - b1), as for Adam (Cohen et al. 2022).
        At lr 0 (the end of a schedule that decays to zero) no curvature is unstable: the threshold is inf.
        """
        group = self.param_groups[0]
        b1, lr = group["betas"][0], group["lr"]
        return (2 + 2 * b1) / ((1 - b1) * lr) if lr else math.inf

    # ------------------------------------------------------------------ step
    def _refresh_now(self) -> bool:
        return self._steps % self.update_each == 0

    def next_step_needs_graph(self) -> bool:
        """Whether the next step differentiates the gradients, so that a backward before it needs ``create_graph``.

        True on the steps that refresh the curvature (every ``update_each``-th) with an estimator that
        needs the gradient's graph. Code that calls backward for the optimizer (training frameworks,
        :mod:`curvkit.integrations`) asks this to pay for the graph only when it is used.

        Returns:
            True when ``.grad`` must come from ``backward(create_graph=True)`` before the next ``step()``.
        """
        return self._refresh_now() and self._estimator.needs_graph

    @with_torch_step_hooks
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step.

        Args:
            closure: returns the loss (or ``(loss, logits)`` for ``estimator="gnb"``); the optimizer then
                differentiates it (whatever the closure did to ``.grad``). A closure may instead run backward
                itself and return the loss detached, as Lightning's do, or return None with the gradients in
                ``.grad``: then, and without a closure, ``.grad`` must come from
                ``loss.backward(create_graph=True)`` on steps where :meth:`next_step_needs_graph` was True.

        Returns:
            The closure's loss (detached), or None without one.

        Raises:
            ValueError: a closure that did not run backward does not return a scalar loss that requires grad.
            RuntimeError: a curvature step without the gradient's graph.
        """
        refresh = self._refresh_now()
        groups = self.param_groups
        params = groups[0]["params"] if len(groups) == 1 else [p for group in groups for p in group["params"]]
        if closure is not None:
            loss, live, grads, curvature = self._from_closure(closure, params, refresh)
        else:
            loss, (live, grads, curvature) = None, self._from_backward(params, refresh)
        if self.distributed:
            average_over_ranks(grads + (curvature.values if curvature else []))
        self._steps += 1
        if len(groups) == 1 and len(live) == len(params):  # the common case: nothing to regroup
            next_probes = self._next_probe_buffers(live, curvature)
            self._update(groups[0], live, grads, curvature, next_probes)
            if next_probes is not None:
                self._prefetched = (self._probe_offset, live, next_probes)
            return loss
        index = {id(p): i for i, p in enumerate(live)}
        for group in groups:
            mine = [index[id(p)] for p in group["params"] if id(p) in index]
            if mine:
                self._update(group, [live[i] for i in mine], [grads[i] for i in mine],
                             curvature and curvature.select(mine), None)
        return loss

    def _next_probe_buffers(self, params, curvature: Curvature | None) -> list[torch.Tensor] | None:
        """Where the update should write the next Hutchinson draw, in the same native call.

        When the next step refreshes the curvature: this step's probe tensors, or new ones; None otherwise.
        """
        if not self._estimator.draws_probes or not self._refresh_now():  # called after the step was counted
            return None
        if curvature is not None and curvature.probes is not None:
            return curvature.probes
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    def _draw(self, params) -> list[torch.Tensor]:
        """The Rademacher probes of the next draw.

        Made in advance by the last update when they are for the same parameters, else drawn now.
        """
        ready, self._prefetched = self._prefetched, None
        if (ready is not None and ready[0] == self._probe_offset and len(ready[1]) == len(params)
                and all(p is q and z.shape == p.shape for p, q, z in zip(params, ready[1], ready[2]))):
            probes = ready[2]
        else:
            fused = False if all(g["fused"] is False for g in self.param_groups) else None
            probes = kernels.rademacher(params, self._probe_seed, self._probe_offset, fused=fused)
        self._probe_offset += 1
        return probes

    def _from_closure(self, closure, params, refresh):
        logits_needed = refresh and self._estimator.needs_logits
        trainable = [p for p in params if p.requires_grad]
        marks = _grad_marks(trainable)
        with torch.enable_grad(), twice_differentiable():
            out = closure()
            loss, logits = out if isinstance(out, tuple) else (out, None)
            # the gradient is in .grad when the closure ran backward and returned the loss detached (Lightning's
            # closures) or returned nothing with gradients present (Lightning's closure in manual optimization)
            from_grad = (loss is None and any(p.grad is not None for p in trainable)) or (
                isinstance(loss, torch.Tensor) and not loss.requires_grad and _grads_changed(trainable, marks))
            if not from_grad:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError("the closure must return the loss as a scalar tensor that requires grad, got "
                                     f"{type(loss).__name__}: return loss_fn(model(x), y), not loss.item() or None")
                try:
                    grads = torch.autograd.grad(loss, trainable,
                                                create_graph=refresh and self._estimator.needs_graph,
                                                retain_graph=True if logits_needed else None, allow_unused=True)
                except RuntimeError as err:
                    if not _grads_changed(trainable, marks):
                        raise
                    raise RuntimeError(
                        "the closure called backward and returned the loss with its graph (the torch.optim closure "
                        "convention). curvkit's curvature optimizers differentiate the loss themselves: return "
                        "loss_fn(model(x), y) without calling backward, or, as training frameworks do, call "
                        "loss.backward(create_graph=opt.next_step_needs_graph()) and return loss.detach()"
                    ) from err
        if from_grad:
            return (None if loss is None else loss.detach(), *self._from_backward(params, refresh))
        live, grads = _drop_unused(trainable, grads)
        curvature = self._curvature(grads, live, logits) if refresh else None
        grads = [g.detach() if g.requires_grad else g for g in grads]
        for p, g in zip(live, grads):
            p.grad = g
        return loss.detach(), live, grads, curvature

    def _from_backward(self, params, refresh):
        live = [p for p in params if p.grad is not None]
        curvature = None
        if refresh and live:
            if self._estimator.needs_logits:
                raise RuntimeError(f'estimator="{self._estimator.name}" needs the logits: pass a closure returning '
                                   "(loss, logits) without calling backward: "
                                   "opt.step(lambda: (loss_fn(logits := model(x), y), logits))")
            if not any(p.grad.requires_grad for p in live):
                raise RuntimeError(
                    "this step refreshes the curvature, which needs the gradient's graph, but .grad came "
                    "from a backward without create_graph=True: call loss.backward(create_graph=True) when "
                    "opt.next_step_needs_graph() (in Lightning derive from curvkit.integrations.lightning."
                    "CurvatureModule, in Hugging Face use curvkit.integrations.transformers.CurvatureTrainer), "
                    "or pass a closure opt.step(lambda: loss_fn(model(x), y)) that returns the loss without "
                    "calling backward"
                )
            curvature = self._curvature([p.grad for p in live], live, None)
        grads = []
        for p in live:
            p.grad = p.grad.detach()
            grads.append(p.grad)
        return live, grads, curvature

    def _curvature(self, grads, params, logits) -> Curvature:
        """The estimator's diagonal; with a graph-needing estimator, zero where a gradient carries no graph."""
        carrying = None
        if self._estimator.needs_graph and not all(g.requires_grad for g in grads):
            carrying = [i for i, g in enumerate(grads) if g.requires_grad]
            if not carrying:
                return Curvature([torch.zeros_like(p) for p in params])
            grads, sub_params = [grads[i] for i in carrying], [params[i] for i in carrying]
        else:
            sub_params = params
        ctx = EstimateContext(sub_params, grads, logits, self._generator, lambda: self._draw(sub_params),
                              self.n_samples)
        try:
            found = self._estimator(ctx)
        except RuntimeError as err:
            if not lacks_double_backward(err):
                raise
            raise RuntimeError(
                f"an operation in the model has no double backward, which the curvature estimate needs ({err}). "
                "Fused attention kernels are the usual cause: pass a closure, opt.step(lambda: loss_fn(model(x), "
                "y)), so that the optimizer runs the forward with PyTorch's twice-differentiable kernel, or run "
                "your forward inside curvkit.hessian.twice_differentiable() before backward(create_graph=True)"
            ) from err
        return found if carrying is None else found.embed(carrying, params)

    def _init_and_count_state(self, params: list, first: str, second: str, counters: tuple[str, ...] = ()):
        """Count a step in every parameter's state; return the states and the two buffer lists.

        A state is created on first use, with zero buffers ``first`` and ``second`` and zero ``counters``.
        """
        states, firsts, seconds = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st.update(step=0, **dict.fromkeys(counters, 0))
                st[first] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st[second] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            states.append(st)
            firsts.append(st[first])
            seconds.append(st[second])
        return states, firsts, seconds

    @abstractmethod
    def _update(self, group: dict, params: list, grads: list, curvature: Curvature | None,
                next_probes: list[torch.Tensor] | None) -> None:
        """Apply the update rule to ``params`` of one group.

        ``curvature`` is None on steps that do not refresh it; afterwards ``next_probes`` (when given) receive
        the probes of draw ``self._probe_offset``.
        """
