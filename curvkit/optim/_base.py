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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import kernels
from ..hessian._random import make_generator

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


class CurvatureOptimizer(torch.optim.Optimizer, ABC):
    """Base class: one gradient and, every ``update_each`` steps, a diagonal curvature estimate.

    Subclasses implement ``_update(group, params, grads, curvature)`` with ``curvature`` a list of
    diagonal estimates (or None on steps that do not refresh it). ``fused``: None runs the compiled
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
        if extra is not None:
            self._steps = extra["steps"]
            self._generator.set_state(extra["generator"])
            self._probe_seed = extra.get("probe_seed", self._probe_seed)
            self._probe_offset = extra.get("probe_offset", self._probe_offset)

    # ------------------------------------------------------------------ step
    def _refresh_now(self) -> bool:
        return self._steps % self.update_each == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step. ``closure`` returns the loss (or ``(loss, logits)`` for ``estimator="gnb"``)
        and must not call backward; without a closure, ``.grad`` must come from
        ``loss.backward(create_graph=True)`` on curvature steps."""
        refresh = self._refresh_now()
        params = [p for group in self.param_groups for p in group["params"]]
        if closure is not None:
            loss, live, curvature = self._from_closure(closure, params, refresh)
        else:
            loss, (live, curvature) = None, self._from_backward(params, refresh)
        grads = [p.grad for p in live]
        if self.distributed:
            self._all_reduce(grads + (curvature or []))
        self._steps += 1
        index = {id(p): i for i, p in enumerate(live)}
        for group in self.param_groups:
            mine = [index[id(p)] for p in group["params"] if id(p) in index]
            if mine:
                self._update(group, [live[i] for i in mine], [grads[i] for i in mine],
                             None if curvature is None else [curvature[i] for i in mine])
        return loss

    def _from_closure(self, closure, params, refresh):
        with torch.enable_grad():
            out = closure()
            loss, logits = out if isinstance(out, tuple) else (out, None)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError("the closure must return the loss as a scalar tensor that requires grad "
                                 "(and must not call backward itself)")
            trainable = [p for p in params if p.requires_grad]
            gnb = refresh and self.estimator == "gnb"
            grads = torch.autograd.grad(loss, trainable, create_graph=refresh and not gnb,
                                        retain_graph=True if gnb else None,
                                        allow_unused=True)
            live = [p for p, g in zip(trainable, grads) if g is not None]
            grads = [g for g in grads if g is not None]
            curvature = None
            if refresh:
                curvature = (self._gauss_newton_bartlett(logits, live) if gnb
                             else self._curvature(grads, live))
        for p, g in zip(live, grads):
            p.grad = g.detach()
        return loss.detach(), live, curvature

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
            with torch.enable_grad():
                curvature = self._curvature([p.grad for p in live], live)
        for p in live:
            p.grad = p.grad.detach()
        return live, curvature

    def _curvature(self, grads, params) -> list[torch.Tensor]:
        """Diagonal estimate from gradients that carry a graph (zeros where a gradient has none)."""
        carrying = [i for i, g in enumerate(grads) if g.requires_grad]
        sub_grads = [grads[i] for i in carrying]
        sub_params = [params[i] for i in carrying]
        if not carrying:
            return [torch.zeros_like(p) for p in params]
        if callable(self.estimator):
            estimates = [d.detach() for d in self.estimator(sub_params, sub_grads, self._generator)]
        else:
            estimates = self._hutchinson(sub_grads, sub_params)
        if len(carrying) == len(params):
            return estimates
        out = [torch.zeros_like(p) for p in params]
        for i, d in zip(carrying, estimates):
            out[i] = d
        return out

    def _hutchinson(self, grads, params) -> list[torch.Tensor]:
        r"""Mean over ``n_samples`` Philox probes of z * (H z): E[D] = diag(H), E[D_i^2] = ||H_{i,:}||^2.

        H z comes from the gradients' graph (released after the last probe); parameters that the
        gradients do not depend on get zeros. With the kernels, z * Hz is formed without reading z
        (it is regenerated from (seed, offset)) into the buffer z occupied.
        """
        on_kernels = kernels.use_kernels(params[0].device, self.fused)
        alpha = 1.0 / self.n_samples
        total = None
        for i in range(self.n_samples):
            offset = self._probe_offset
            self._probe_offset += 1
            zs = kernels.rademacher(params, self._probe_seed, offset, fused=self.fused)
            hz = torch.autograd.grad(grads, params, zs, retain_graph=i < self.n_samples - 1, allow_unused=True)
            live = [j for j, h in enumerate(hz) if h is not None]
            for j in set(range(len(params))) - set(live):
                zs[j].zero_()
            out, acc_hz = (zs if total is None else total), [hz[j] for j in live]
            if on_kernels:
                kernels.accumulate_zhz_([out[j] for j in live], acc_hz, self._probe_seed, offset, alpha,
                                        accumulate=total is not None, fused=self.fused)
            else:
                d = [zs[j] for j in live]
                torch._foreach_mul_(d, acc_hz)
                if total is not None:
                    torch._foreach_add_([total[j] for j in live], d, alpha=alpha)
                elif alpha != 1:
                    torch._foreach_mul_(d, alpha)
            total = out
        return total

    def _gauss_newton_bartlett(self, logits, params) -> list[torch.Tensor]:
        r"""GNB: labels sampled from softmax(logits); D = B * ghat * ghat (Liu et al. 2023)."""
        if logits is None:
            raise ValueError('estimator="gnb" needs the closure to return (loss, logits)')
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

    def _advance(self, params: list, buffers: tuple[str, ...], counters: tuple[str, ...] = ()) -> list[dict]:
        """Per-parameter state, created with zero ``buffers`` and ``counters`` on first use; counts the step."""
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = 0
                st.update(dict.fromkeys(counters, 0))
                st.update({b: torch.zeros_like(p, memory_format=torch.preserve_format) for b in buffers})
            st["step"] += 1
        return states

    @abstractmethod
    def _update(self, group: dict, params: list, grads: list, curvature: list | None) -> None:
        """Apply the update rule to ``params`` of one group (``curvature`` None on non-refresh steps)."""
