"""What ``torch.optim.Optimizer`` wraps around ``step``, for optimizers that define their own wrapper.

torch wraps every ``step`` in a profiler range and the step pre- and post-hooks (global ones from
``register_optimizer_step_pre_hook`` and per-optimizer ones from ``register_step_pre_hook``). The
curvature optimizers keep that behaviour but open the profiler range only while a profiler runs
(torch opens it on every step, which costs a measurable share of a small model's step). This shim
reads torch's hook registries, which are private: ``tests/optim/test_step_hooks.py`` checks it
against the installed torch's own wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def with_torch_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``step`` in the step hooks and profiler range of ``torch.optim.Optimizer``.

    The wrapper is marked ``hooked`` so that ``Optimizer`` does not wrap it a second time.

    Args:
        step: an optimizer's ``step(self, *args, **kwargs)``.

    Returns:
        The wrapped ``step``.
    """

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _run_step_hooks(step, args, kwargs)
        return _run_step_hooks(step, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _run_step_hooks(step, args, kwargs):
    """Hooks and step as torch runs them: ``args`` start with the optimizer, and a pre-hook may replace both."""
    optimizer = args[0]
    for hook in (*_global_optimizer_pre_hooks.values(), *optimizer._optimizer_step_pre_hooks.values()):
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"a step pre-hook must return None or (new_args, new_kwargs), got {result!r}")
            args, kwargs = result
    out = step(*args, **kwargs)
    step_code = getattr(optimizer, "_optimizer_step_code", None)  # a profiler anchor; not in every torch version
    if step_code is not None:
        step_code()
    for hook in (*optimizer._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
        hook(optimizer, args, kwargs)
    return out
