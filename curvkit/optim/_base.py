"""Shared machinery of the curvature optimizers: gradients and a diagonal curvature estimate per step.

A step gets its gradient either from a closure (the optimizer calls ``torch.autograd.grad``
itself, with ``create_graph`` only on curvature steps) or from ``.grad`` left by
``loss.backward(create_graph=True)``. Either way ``.grad`` ends graph-free, so no
parameter <-> gradient reference cycle survives the step.

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

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import kernels
from .._utils.random import make_generator

Estimator = Union[str, Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Generator], list]]
ESTIMATORS = ("hutchinson", "gnb")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_common(lr, betas, weight_decay, update_each, n_samples, estimator, fused) -> None:
    """Clear errors for the hyperparameters every curvature optimizer shares."""
    _check(isinstance(lr, (int, float)) and lr >= 0, f"lr must be a non-negative number, got {lr!r}")
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
           f"betas must be two numbers in [0, 1), got {betas!r}")
    _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}")
    _check(isinstance(update_each, int) and update_each >= 1,
           f"update_each must be a positive integer (curvature refreshed every that many steps), got {update_each!r}")
    _check(isinstance(n_samples, int) and n_samples >= 1, f"n_samples must be a positive integer, got {n_samples!r}")
    _check(callable(estimator) or estimator in ESTIMATORS,
           f"estimator must be one of {ESTIMATORS} or a callable(params, grads, generator), got {estimator!r}")
    _check(fused is None or isinstance(fused, bool),
           f"fused must be None (compiled kernels where available), True (require them) or False, got {fused!r}")


def _with_step_hooks(step):
    """What ``torch.optim.Optimizer`` wraps around ``step``: the step pre- and post-hooks (global and
    per optimizer) and a profiler range, which is only opened while a profiler runs. (Optimizer's own
    wrapper opens it on every step: tens of microseconds, a few percent of a small model's Hessian
    step.) Marked ``hooked`` so that Optimizer does not wrap the step a second time."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _hooked(self, step, args, kwargs)
        return _hooked(self, step, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _hooked(optimizer, step, args, kwargs):
    for hook in (*_global_optimizer_pre_hooks.values(), *optimizer._optimizer_step_pre_hooks.values()):
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"a step pre-hook must return None or (new_args, new_kwargs), got {result!r}")
            args, kwargs = result
    out = step(optimizer, *args, **kwargs)
    step_code = getattr(optimizer, "_optimizer_step_code", None)  # a profiler anchor; not in every torch version
    if step_code is not None:
        step_code()
    for hook in (*optimizer._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
        hook(optimizer, args, kwargs)
    return out


class Curvature(NamedTuple):
    """A step's diagonal curvature estimate per parameter: ``values`` itself, or ``probes * values`` when
    probes are given (then ``values`` holds H z). The fused updates form the product themselves."""

    values: list[torch.Tensor]
    probes: list[torch.Tensor] | None = None

    def select(self, index: list[int]) -> Curvature:
        pick = lambda tensors: None if tensors is None else [tensors[i] for i in index]  # noqa: E731
        return Curvature(pick(self.values), pick(self.probes))

    def embed(self, index: list[int], params: list[torch.Tensor]) -> Curvature:
        """This estimate of ``params[i] for i in index``, with zeros for the other parameters."""
        values = [torch.zeros_like(p) for p in params]
        probes = None if self.probes is None else [torch.ones_like(p) for p in params]
        for k, i in enumerate(index):
            values[i] = self.values[k]
            if probes is not None:
                probes[i] = self.probes[k]
        return Curvature(values, probes)


def _drop_unused(params: list[torch.Tensor], grads) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that received a gradient, and their gradients."""
    if all(g is not None for g in grads):
        return params, list(grads)
    kept = [(p, g) for p, g in zip(params, grads) if g is not None]
    return [p for p, _ in kept], [g for _, g in kept]


class CurvatureOptimizer(torch.optim.Optimizer, ABC):
    """Base class: one gradient and, every ``update_each`` steps, a diagonal curvature estimate.

    Subclasses implement ``_update(group, params, grads, curvature, next_probes)`` with ``curvature`` a
    :class:`Curvature` (or None on steps that do not refresh it). ``fused``: None runs the compiled
    kernels of :mod:`curvkit.kernels` where they are built, True requires them (RuntimeError here if
    they cannot run), False runs the PyTorch (foreach) path.
    """

    def __init__(self, params, defaults: dict, *, update_each: int, n_samples: int, estimator: Estimator,
                 seed: Any, distributed: bool | None, fused: bool | None):
        super().__init__(params, defaults)
        self.update_each = update_each
        self.n_samples = n_samples
        self.estimator = estimator
        self.fused = fused
        if fused:
            for device in {p.device for group in self.param_groups for p in group["params"]}:
                kernels.use_kernels(device, fused=True)
        self.distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        self._generator = make_generator(seed, shared=self.distributed)
        self._probe_seed = self._generator.initial_seed()
        self._probe_offset = 0
        self._prefetched = None  # (offset, params, probes): a draw that the last update made in advance
        self._steps = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["curvkit"] = {"steps": self._steps, "generator": self._generator.get_state(),
                            "probe_seed": self._probe_seed, "probe_offset": self._probe_offset}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvkit", None)
        super().load_state_dict(state_dict)
        self._prefetched = None
        if extra is not None:
            self._steps = extra["steps"]
            self._generator.set_state(extra["generator"])
            self._probe_seed = extra.get("probe_seed", self._probe_seed)
            self._probe_offset = extra.get("probe_offset", self._probe_offset)

    # ------------------------------------------------------------------ step
    def _refresh_now(self) -> bool:
        return self._steps % self.update_each == 0

    @_with_step_hooks
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step. ``closure`` returns the loss (or ``(loss, logits)`` for ``estimator="gnb"``)
        and must not call backward; without a closure, ``.grad`` must come from
        ``loss.backward(create_graph=True)`` on curvature steps."""
        refresh = self._refresh_now()
        groups = self.param_groups
        params = groups[0]["params"] if len(groups) == 1 else [p for group in groups for p in group["params"]]
        if closure is not None:
            loss, live, grads, curvature = self._from_closure(closure, params, refresh)
        else:
            loss, (live, grads, curvature) = None, self._from_backward(params, refresh)
        if self.distributed:
            self._all_reduce(grads + (curvature.values if curvature else []))
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
        """Where the update should write the next Hutchinson draw, in the same native call, when the next
        step refreshes the curvature: this step's probe tensors, or new ones. None otherwise."""
        if self.estimator != "hutchinson" or not self._refresh_now():  # called after the step was counted
            return None
        if curvature is not None and curvature.probes is not None:
            return curvature.probes
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    def _draw(self, params) -> list[torch.Tensor]:
        """The Rademacher probes of the next draw: made in advance by the last update when they are for the
        same parameters, else drawn now."""
        ready, self._prefetched = self._prefetched, None
        if (ready is not None and ready[0] == self._probe_offset and len(ready[1]) == len(params)
                and all(p is q and z.shape == p.shape for p, q, z in zip(params, ready[1], ready[2]))):
            probes = ready[2]
        else:
            probes = kernels.rademacher(params, self._probe_seed, self._probe_offset, fused=self.fused)
        self._probe_offset += 1
        return probes

    def _from_closure(self, closure, params, refresh):
        gnb = refresh and self.estimator == "gnb"
        with torch.enable_grad():
            out = closure()
            loss, logits = out if isinstance(out, tuple) else (out, None)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError("the closure must return the loss as a scalar tensor that requires grad "
                                 "(and must not call backward itself)")
            trainable = [p for p in params if p.requires_grad]
            grads = torch.autograd.grad(loss, trainable, create_graph=refresh and not gnb,
                                        retain_graph=True if gnb else None, allow_unused=True)
        live, grads = _drop_unused(trainable, grads)
        curvature = None
        if refresh:
            curvature = (Curvature(self._gauss_newton_bartlett(logits, live)) if gnb
                         else self._curvature(grads, live))
        grads = [g.detach() if g.requires_grad else g for g in grads]
        for p, g in zip(live, grads):
            p.grad = g
        return loss.detach(), live, grads, curvature

    def _from_backward(self, params, refresh):
        live = [p for p in params if p.grad is not None]
        curvature = None
        if refresh and live:
            if self.estimator == "gnb":
                raise RuntimeError('estimator="gnb" needs a closure returning (loss, logits): '
                                   "opt.step(lambda: (loss_fn(logits := model(x), y), logits))")
            if not any(p.grad.requires_grad for p in live):
                raise RuntimeError(
                    "this step refreshes the curvature, which needs the gradient's graph: call "
                    "loss.backward(create_graph=True) before step(), or pass a closure "
                    "opt.step(lambda: loss_fn(model(x), y)) that returns the loss without calling backward"
                )
            curvature = self._curvature([p.grad for p in live], live)
        grads = []
        for p in live:
            p.grad = p.grad.detach()
            grads.append(p.grad)
        return live, grads, curvature

    def _curvature(self, grads, params) -> Curvature:
        """Diagonal estimate from gradients that carry a graph (zero where a gradient has none)."""
        if all(g.requires_grad for g in grads):
            carrying, sub_grads, sub_params = None, grads, params
        else:
            carrying = [i for i, g in enumerate(grads) if g.requires_grad]
            sub_grads, sub_params = [grads[i] for i in carrying], [params[i] for i in carrying]
            if not carrying:
                return Curvature([torch.zeros_like(p) for p in params])
        if callable(self.estimator):
            with torch.enable_grad():
                found = Curvature([d.detach() for d in self.estimator(sub_params, sub_grads, self._generator)])
        else:
            found = self._hutchinson(sub_grads, sub_params)
        return found if carrying is None else found.embed(carrying, params)

    def _hutchinson(self, grads, params) -> Curvature:
        r"""Hutchinson diagonal: the mean over ``n_samples`` Philox probes of z * (H z), with
        E[D] = diag(H) and E[D_i^2] = ||H_{i,:}||^2.

        H z comes from the gradients' graph (released after the last probe); parameters that the
        gradients do not depend on get zeros. With one probe the product z * Hz is left to the fused
        update (``Curvature(hz, probes=z)``); with more, it is averaged here.
        """
        total = None
        for i in range(self.n_samples):
            zs = self._draw(params)
            hz = torch.autograd.grad(grads, params, zs, retain_graph=i < self.n_samples - 1, allow_unused=True)
            hz = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hz)]
            if self.n_samples == 1:
                return Curvature(hz, probes=zs)
            if total is None:
                total = torch._foreach_mul(zs, hz)
            else:
                torch._foreach_addcmul_(total, zs, hz)
        torch._foreach_mul_(total, 1.0 / self.n_samples)
        return Curvature(total)

    def _gauss_newton_bartlett(self, logits, params) -> list[torch.Tensor]:
        r"""GNB: labels sampled from softmax(logits); D = B * ghat * ghat (Liu et al. 2023)."""
        if logits is None:
            raise ValueError('estimator="gnb" needs the closure to return (loss, logits)')
        with torch.enable_grad():  # the step runs under no_grad; reshape may copy, which must be recorded
            logits = logits.reshape(-1, logits.shape[-1])
            probs = torch.softmax(logits.detach().float(), -1).cpu()
            sampled = torch.multinomial(probs, 1, generator=self._generator).squeeze(1).to(logits.device)
            grads = torch.autograd.grad(F.cross_entropy(logits, sampled), params, allow_unused=True)
        batch = logits.shape[0]
        return [torch.zeros_like(p) if g is None else g.square().mul_(batch) for p, g in zip(params, grads)]

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over ranks with one all-reduce."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _advance(self, params: list, first: str, second: str, counters: tuple[str, ...] = ()):
        """Counts a step in every parameter's state (created on first use: zero buffers ``first`` and
        ``second``, zero ``counters``); returns the states and the two buffer lists."""
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
        """Apply the update rule to ``params`` of one group (``curvature`` None on non-refresh steps), then
        fill ``next_probes`` (when given) with the probes of draw ``self._probe_offset``."""
