r"""Per-step diagonal curvature estimators for the curvature optimizers: one protocol, one registry.

An estimator turns one step's gradients into a diagonal curvature estimate per parameter:

- ``"hutchinson"``: :math:`D = z \odot (H z)` for Rademacher z (E[D] = diag H), averaged over
  ``n_samples`` probes; needs the gradients' graph (``create_graph=True``);
- ``"gnb"`` (Gauss-Newton-Bartlett, Liu et al. 2023): labels sampled from softmax(logits),
  :math:`D = B\, \hat g \odot \hat g` with :math:`\hat g` the gradient of the sampled loss; needs
  the closure to return ``(loss, logits)`` but no second derivative;
- a callable ``fn(params, grads, generator) -> list of tensors`` shaped like ``params``, given
  gradients that carry a graph and the optimizer's generator.

Adding an estimator means adding a class with the :class:`DiagonalEstimator` attributes and an
entry in :data:`ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, Union

import torch
import torch.nn.functional as F

EstimatorFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Generator], list]
Estimator = Union[str, EstimatorFn]


class Curvature(NamedTuple):
    """A step's diagonal curvature estimate per parameter.

    It is ``values`` itself, or ``probes * values`` when ``probes`` are given (then ``values`` holds H z
    and the fused updates form the product themselves).
    """

    values: list[torch.Tensor]
    probes: list[torch.Tensor] | None = None

    def select(self, index: list[int]) -> Curvature:
        """The estimate of the parameters at ``index``."""
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


class EstimateContext(NamedTuple):
    """What an estimator may use on a step.

    ``params`` and ``grads`` (with a graph when the estimator ``needs_graph``); ``logits`` from a closure
    that returns ``(loss, logits)``; ``generator``, the optimizer's own torch.Generator; ``draw()``, the
    next Philox Rademacher draw shaped like ``params``; ``n_samples``, the number of probes asked for.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    logits: torch.Tensor | None
    generator: torch.Generator
    draw: Callable[[], list[torch.Tensor]]
    n_samples: int


class DiagonalEstimator(Protocol):
    """The estimator protocol: what the optimizer must provide, and the estimate.

    ``needs_graph``: the gradients must carry a graph (the optimizer differentiates with
    ``create_graph=True`` on curvature steps); ``needs_logits``: the closure must return ``(loss, logits)``;
    ``draws_probes``: the estimator draws Philox probes, so the update before a refresh may draw them in
    advance; ``name``: saved in ``state_dict`` and checked on load.
    """

    name: str
    needs_graph: bool
    needs_logits: bool
    draws_probes: bool

    def __call__(self, ctx: EstimateContext) -> Curvature:
        """The diagonal estimate of one step."""


class Hutchinson:
    r"""Hutchinson diagonal: the mean over ``n_samples`` Philox probes of :math:`z \odot (H z)`.

    :math:`E[D] = \mathrm{diag}(H)` and :math:`E[D_i^2] = \|H_{i,:}\|^2`. H z comes from the gradients'
    graph (released after the last probe); parameters that the gradients do not depend on get zeros.
    With one probe the product is left to the fused update (``Curvature(hz, probes=z)``).
    """

    name = "hutchinson"
    needs_graph = True
    needs_logits = False
    draws_probes = True

    def __call__(self, ctx: EstimateContext) -> Curvature:
        """The mean of z * Hz over ``ctx.n_samples`` probes (left to the fused update for one probe)."""
        total = None
        for i in range(ctx.n_samples):
            zs = ctx.draw()
            hz = torch.autograd.grad(ctx.grads, ctx.params, zs, retain_graph=i < ctx.n_samples - 1,
                                     allow_unused=True)
            hz = [torch.zeros_like(p) if h is None else h for p, h in zip(ctx.params, hz)]
            if ctx.n_samples == 1:
                return Curvature(hz, probes=zs)
            if total is None:
                total = torch._foreach_mul(zs, hz)
            else:
                torch._foreach_addcmul_(total, zs, hz)
        torch._foreach_mul_(total, 1.0 / ctx.n_samples)
        return Curvature(total)


class GaussNewtonBartlett:
    r"""Gauss-Newton-Bartlett (GNB) diagonal estimate.

    Labels :math:`\hat y` sampled from softmax(logits); :math:`D = B\, \hat g \odot \hat g` with
    :math:`\hat g = \nabla_\theta \mathrm{CE}(\mathrm{logits}, \hat y)` (Liu et al. 2023).
    """

    name = "gnb"
    needs_graph = False
    needs_logits = True
    draws_probes = False

    def __call__(self, ctx: EstimateContext) -> Curvature:
        """B * ghat * ghat from one sampled label per row of the logits."""
        if ctx.logits is None:
            raise ValueError('estimator="gnb" needs the closure to return (loss, logits)')
        with torch.enable_grad():  # the step runs under no_grad; reshape may copy, which must be recorded
            logits = ctx.logits.reshape(-1, ctx.logits.shape[-1])
            probs = torch.softmax(logits.detach().float(), -1).cpu()
            sampled = torch.multinomial(probs, 1, generator=ctx.generator).squeeze(1).to(logits.device)
            grads = torch.autograd.grad(F.cross_entropy(logits, sampled), ctx.params, allow_unused=True)
        batch = logits.shape[0]
        return Curvature([torch.zeros_like(p) if g is None else g.square().mul_(batch)
                          for p, g in zip(ctx.params, grads)])


class CallableEstimator:
    """A user's ``fn(params, grads, generator) -> list of tensors`` as an estimator (gradients with a graph)."""

    name = "callable"
    needs_graph = True
    needs_logits = False
    draws_probes = False

    def __init__(self, fn: EstimatorFn):
        self.fn = fn

    def __call__(self, ctx: EstimateContext) -> Curvature:
        """The callable's output, detached."""
        with torch.enable_grad():
            return Curvature([d.detach() for d in self.fn(ctx.params, ctx.grads, ctx.generator)])


ESTIMATORS: dict[str, Callable[[], DiagonalEstimator]] = {"hutchinson": Hutchinson, "gnb": GaussNewtonBartlett}


def make_estimator(estimator: Any) -> DiagonalEstimator:
    """The estimator named ``estimator`` in :data:`ESTIMATORS`, or a callable wrapped as one.

    Args:
        estimator: a name in :data:`ESTIMATORS` or a callable ``fn(params, grads, generator)``.

    Returns:
        An object following :class:`DiagonalEstimator`.

    Raises:
        ValueError: an unknown name or another type.
    """
    if isinstance(estimator, str) and estimator in ESTIMATORS:
        return ESTIMATORS[estimator]()
    if callable(estimator) and not isinstance(estimator, str):
        return CallableEstimator(estimator)
    raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)} or a callable(params, grads, generator), "
                     f"got {estimator!r}")
