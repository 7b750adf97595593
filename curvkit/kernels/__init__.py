r"""Fused C++/CUDA kernels from csrc/ with pure-PyTorch references, one dispatch function per op.

Each function below runs the compiled op (``torch.ops.curvkit.*``) for its tensors' device when it is
built and takes them, and otherwise the reference of the same name in :mod:`curvkit.kernels.reference`
(same arithmetic, any device). ``fused=None`` picks (CPU kernels where built; the CUDA kernels are not
yet verified on a GPU, so CUDA runs the references), ``True`` requires the kernel (an error says why it
cannot run), ``False`` forces the reference. The libraries build with ninja on first use, are cached
on disk, and a failed build warns once and falls back.

Lists are one parameter group: one call updates all of its tensors (contiguous, one floating dtype,
one device). The ops have no derivatives: they run under ``torch.no_grad()``. Probes are Rademacher
vectors from Philox4x32-10 keyed by ``(seed, offset)``, generated where they are used and
bit-identical between the kernels and the reference on every device.

.. code-block:: python

    from curvkit import kernels
    kernels.available()                                   # {"cpu": True, "cuda": False}
    zs = kernels.rademacher(params, seed=0, offset=step)  # +-1 probes shaped like params
    dots = kernels.accumulate_zhz_(d, hz, seed=0, offset=step)   # d += z * hz, dots[j] = z_j . hz_j
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch

from . import build, reference

__all__ = ["accumulate_zhz_", "adahessian_step_", "available", "rademacher", "rademacher_", "reference",
           "softmax_ce_hessian_product", "sophia_step_", "use_kernels"]


def available() -> dict[str, bool]:
    """Which compiled kernels this process can use, building them on first call: ``{"cpu": ..., "cuda": ...}``."""
    return {kind: build.load(kind) for kind in build.LIBRARIES}


def _unavailable(device: torch.device) -> str | None:
    """Why there is no kernel for ``device`` (None if there is one)."""
    if build.disabled():
        return "the kernels are turned off by CURVKIT_KERNELS=0"
    if device.type not in build.LIBRARIES:
        return f"there are no kernels for {device.type} tensors (only cpu and cuda)"
    if not build.load(device.type):
        return f"the {device.type} kernels failed to build or load ({build.error(device.type)})"
    return None


VERIFIED = frozenset({"cpu"})  # devices whose kernels have been checked against the references on hardware


def use_kernels(device: torch.device | str, fused: bool | None = None) -> bool:
    """Whether ops on ``device`` run the kernels.

    ``fused=None``: where they are built and verified on hardware (:data:`VERIFIED`; the CUDA kernels
    compile but have not yet run on a GPU, so CUDA takes the PyTorch path); ``True``: always (raising
    RuntimeError with the reason where they cannot run, and warning once on an unverified device);
    ``False``: never.

    Raises:
        RuntimeError: ``fused=True`` where the kernels cannot run.
    """
    if fused is False:
        return False
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind not in VERIFIED:
        if not fused:
            return False
        if kind in build.LIBRARIES:
            _warn_unverified(kind)
    if build.loaded(kind):  # the per-step fast path
        return True
    reason = _unavailable(torch.device(device))
    if reason is not None and fused:
        raise RuntimeError(f"fused=True needs curvkit's compiled kernels, but {reason}; "
                           "use fused=None (kernels where available) or fused=False (the PyTorch path)")
    return reason is None


@functools.cache
def _warn_unverified(kind: str) -> None:
    warnings.warn(f"fused=True runs curvkit's {kind} kernels, which have not yet been verified against the "
                  "references on hardware; fused=None (the default) uses the PyTorch path there",
                  RuntimeWarning, stacklevel=4)


_ops: dict[str, torch._ops.OpOverload] = {}


def _run_native(name: str, first: torch.Tensor, fused: bool | None, *args):
    """Run kernel ``name`` if the dispatch allows; ``NotImplemented`` where the reference must run.

    The kernels check their arguments before touching any data, so an argument they refuse
    (a non-contiguous tensor, mixed dtypes) falls back to the reference unless ``fused=True``.
    """
    if not use_kernels(first.device, fused):
        return NotImplemented
    try:
        op = _ops.get(name)
        if op is None:
            op = _ops[name] = getattr(torch.ops.curvkit, name).default
        return op(*args)
    except RuntimeError as error:
        if fused or "curvkit::" not in str(error):  # argument checks read "curvkit::<op>: ..."
            raise
        return NotImplemented


def _no_grad(fn):
    """``torch.no_grad()`` around ``fn`` when grad mode is on (the ops have no derivatives); free otherwise."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@_no_grad
def adahessian_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                     exp_hess_sq: list[torch.Tensor], curvature: list[torch.Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, hessian_power: float,
                     bias_correction1: Sequence[float], bias_correction2: Sequence[float], *,
                     probes: list[torch.Tensor] | None = None, windows: Sequence[int] | None = None,
                     next_probes: list[torch.Tensor] | None = None, probe_seed: int = 0, next_offset: int = 0,
                     fused: bool | None = None) -> None:
    """Fused AdaHessian update of one parameter group.

    The curvature estimate is ``curvature``, or ``probes * curvature`` (curvature = Hz), averaged over
    ``windows``; afterwards ``next_probes`` (which may be ``probes``) receive the probes of draw
    ``(probe_seed, next_offset)``. See :func:`curvkit.kernels.reference.adahessian_step_`.
    """
    probes, windows, next_probes = probes or [], windows or [], next_probes or []
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(hessian_power),
             list(bias_correction1), list(bias_correction2))
    if params and _run_native("adahessian_step_", params[0], fused, params, grads, exp_avg, exp_hess_sq, curvature,
                        probes, list(windows), next_probes, _signed(probe_seed), _signed(next_offset),
                        *hyper) is NotImplemented:
        reference.adahessian_step_(params, grads, exp_avg, exp_hess_sq, curvature, *hyper, probes=probes,
                                   windows=windows, next_probes=next_probes, probe_seed=probe_seed,
                                   next_offset=next_offset)


@_no_grad
def sophia_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                 hessian: list[torch.Tensor], curvature: list[torch.Tensor], lr: float, beta1: float, beta2: float,
                 rho: float, eps: float, weight_decay: float, *, probes: list[torch.Tensor] | None = None,
                 next_probes: list[torch.Tensor] | None = None, probe_seed: int = 0, next_offset: int = 0,
                 fused: bool | None = None) -> None:
    """Fused Sophia update of one parameter group.

    The estimate is ``curvature`` or ``probes * curvature``; ``next_probes`` as in :func:`adahessian_step_`.
    See :func:`curvkit.kernels.reference.sophia_step_`.
    """
    probes, next_probes = probes or [], next_probes or []
    hyper = (float(lr), float(beta1), float(beta2), float(rho), float(eps), float(weight_decay))
    if params and _run_native("sophia_step_", params[0], fused, params, grads, exp_avg, hessian, curvature, probes,
                        next_probes, _signed(probe_seed), _signed(next_offset), *hyper) is NotImplemented:
        reference.sophia_step_(params, grads, exp_avg, hessian, curvature, *hyper, probes=probes,
                               next_probes=next_probes, probe_seed=probe_seed, next_offset=next_offset)


@_no_grad
def rademacher(like: list[torch.Tensor], seed: int, offset: int, *, fused: bool | None = None) -> list[torch.Tensor]:
    """The Rademacher probes of draw ``(seed, offset)`` as new contiguous tensors shaped like ``like``."""
    reference.check_seed(seed, offset)
    if not like:
        return []
    out = _run_native("rademacher", like[0], fused, like, _signed(seed), _signed(offset))
    return reference.rademacher(like, seed, offset) if out is NotImplemented else out


@_no_grad
def rademacher_(out: list[torch.Tensor], seed: int, offset: int, *, fused: bool | None = None) -> None:
    """Fill ``out`` with the Rademacher probes of draw ``(seed, offset)``; see :mod:`curvkit.kernels.reference`."""
    reference.check_seed(seed, offset)
    if out and _run_native("rademacher_", out[0], fused, out, _signed(seed), _signed(offset)) is NotImplemented:
        reference.rademacher_(out, seed, offset)


@_no_grad
def accumulate_zhz_(acc: list[torch.Tensor], hz: list[torch.Tensor], seed: int, offset: int, alpha: float = 1.0,
                    accumulate: bool = True, *, fused: bool | None = None) -> torch.Tensor:
    """``acc += alpha * z * hz`` with the probes z of draw ``(seed, offset)`` regenerated, not read.

    Returns:
        The float64 dots ``z_j . hz_j``. See :func:`curvkit.kernels.reference.accumulate_zhz_`.
    """
    reference.check_seed(seed, offset)
    if not acc:
        return torch.zeros(0, dtype=torch.float64)
    dots = _run_native("accumulate_zhz_", acc[0], fused, acc, hz, _signed(seed), _signed(offset), float(alpha),
                 bool(accumulate))
    if dots is NotImplemented:
        dots = reference.accumulate_zhz_(acc, hz, seed, offset, alpha, accumulate)
    return dots


@_no_grad
def softmax_ce_hessian_product(logits: torch.Tensor, u: torch.Tensor, scale: float, *,
                               fused: bool | None = None) -> torch.Tensor:
    """``scale * (diag(p) - p p^T) u`` per row of 2-D ``logits``, p = softmax(logits, 1), in one pass."""
    out = _run_native("softmax_ce_hessian_product", logits, fused, logits, u, float(scale))
    return reference.softmax_ce_hessian_product(logits, u, scale) if out is NotImplemented else out


def _signed(value: int) -> int:
    """A uint64 as the int64 with the same bits (torch's ``int`` arguments are signed)."""
    return value - (1 << 64) if value >= 1 << 63 else value
