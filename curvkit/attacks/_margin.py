r"""Logit margins and the borrowed model's evaluations for the attacks.

For an example with true class y and logits z, the margin toward class t is :math:`z_y - z_t`, and
the example's margin is :math:`z_y - \max_{k \ne y} z_k` (negative when misclassified). The model is
borrowed: it runs in eval mode for the attack (each module's mode is restored after), and gradients
are taken w.r.t. the inputs only (``torch.autograd.grad``), so parameters, buffers and ``.grad`` are
never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode for the duration, then restore each module's own mode."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_logits(logits: object, y: torch.Tensor) -> torch.Tensor:
    """The model's output, if it is a floating-point (N, C) tensor with C >= 2 and every label below C."""
    if (not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(y)
            or logits.shape[1] < 2 or not logits.is_floating_point()):
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return floating-point logits of shape (N, C) with C >= 2 classes for "
                         f"N = {len(y)} inputs, got {got}; wrap it so that it returns the logits")
    if int(y.max()) >= logits.shape[1]:
        raise ValueError(f"labels y must lie in [0, {logits.shape[1]}) for a model with {logits.shape[1]} classes, "
                         f"got {int(y.max())}")
    return logits


def logits_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's logits at ``x`` (labels ``y``) without a graph."""
    with torch.no_grad():
        return check_logits(model(x), y)


def best_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`z_y - \max_{k \ne y} z_k` per row."""
    wrong = logits.scatter(1, y[:, None], -torch.inf)
    return logits.gather(1, y[:, None])[:, 0] - wrong.amax(1)


def broken(margin: torch.Tensor, confidence: float) -> torch.Tensor:
    """Whether the best wrong logit beats the true one (strictly) by at least ``confidence``."""
    return (margin < 0) & (margin <= -confidence)


def margin_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Logits, the margins :math:`z_y - z_t` toward ``targets`` and their input gradients.

    One forward and one backward pass.
    """
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        logits = check_logits(model(leaf), y)
        margin = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, targets[:, None])[:, 0]
        (grad,) = torch.autograd.grad(margin.sum(), leaf)
    return logits.detach(), margin.detach(), grad


def candidate_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The k most likely wrong classes (k capped at C - 1) with their margins and the Jacobian of those margins.

    One forward pass and one batched backward pass (``is_grads_batched``; k ordinary backward passes through
    the same graph where the model has an operation vmap cannot batch): the gradients of only those k margins.

    Returns:
        The logits (N, C); the classes (N, k), most likely first; the margins :math:`z_y - z_c` (N, k);
        their input gradients (k, N, ...).
    """
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        logits = check_logits(model(leaf), y)
    k = min(k, logits.shape[1] - 1)
    wrong = logits.detach().scatter(1, y[:, None], -torch.inf)
    classes = wrong.topk(k, dim=1).indices
    seeds = torch.zeros(k, *logits.shape, dtype=logits.dtype, device=logits.device)
    seeds.scatter_(2, y[None, :, None].expand(k, -1, 1), 1.0)
    seeds.scatter_(2, classes.T[:, :, None], -1.0)
    try:
        (jacobian,) = torch.autograd.grad(logits, leaf, seeds, retain_graph=True, is_grads_batched=True)
    except RuntimeError:  # an operation without a batching rule: one backward pass per candidate
        jacobian = torch.stack([torch.autograd.grad(logits, leaf, seed, retain_graph=True)[0] for seed in seeds])
    logits = logits.detach()
    return logits, classes, logits.gather(1, y[:, None]) - logits.gather(1, classes), jacobian


def pair_margin(outputs: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``z[true] - z[target]`` for one example (outputs (1, C), pair (1, 2)): the function the order-2 model expands."""
    picked = outputs.gather(1, pair)
    return picked[0, 0] - picked[0, 1]
