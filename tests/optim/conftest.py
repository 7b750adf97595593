"""The optimizer registry: every curvkit optimizer, present and future, runs the contract in test_contract.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from curvkit.optim import AdaHessian, CrAM, LocalNewton, NewtonCG, Sophia


@dataclass
class OptimizerCase:
    """How to build one optimizer for the contract tests.

    ``make(params, **overrides)`` builds it with test defaults; ``bad`` lists (kwargs, message regex) that
    must raise ValueError; ``backward``: it also takes ``.grad`` from ``loss.backward(create_graph=True)``;
    ``preconditioned``: it has ``exp_avg`` state and steps by lr * exp_avg / preconditioner() on
    unclipped coordinates; ``setting``: an optimizer-wide setting and two values, a state saved with the
    first must be refused by an optimizer built with the second; ``diagonal``: a DiagonalCurvatureOptimizer
    (update_each, estimators, closures that ran backward with or without the graph).
    """

    name: str
    make: Callable[..., torch.optim.Optimizer]
    bad: list[tuple[dict, str]] = field(default_factory=list)
    backward: bool = True
    preconditioned: bool = True
    setting: tuple = ("update_each", 3, 1)
    diagonal: bool = True

    def __repr__(self) -> str:
        return self.name


OPTIMIZERS = [
    OptimizerCase(
        "AdaHessian",
        lambda params, **kw: AdaHessian(params, **{"lr": 0.1, "seed": 0, **kw}),
        bad=[(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"), (dict(betas=(0.9,)), "betas"),
             (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(hessian_power=1.5), "hessian"),
             (dict(update_each=0), "update_each"), (dict(update_each=2.5), "update_each"),
             (dict(n_samples=0), "n_samples"), (dict(estimator="exact"), "estimator"), (dict(fused="yes"), "fused")],
    ),
    OptimizerCase(
        "Sophia",
        lambda params, **kw: Sophia(params, **{"lr": 0.01, "seed": 0, "update_each": 2, **kw}),
        bad=[(dict(rho=0.0), "rho"), (dict(eps=-1.0), "eps"), (dict(update_each=2.5), "update_each"),
             (dict(lr=-1), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(estimator=3), "estimator"),
             (dict(fused=1), "fused")],
    ),
    OptimizerCase(
        "CrAM",
        lambda params, **kw: CrAM(params, **{"lr": 0.1, "momentum": 0.9, "rho": 0.05, "sparsities": (0.5,),
                                             "seed": 0, **kw}),
        bad=[(dict(rho=-0.1), "rho"), (dict(sparsities=(1.0,)), "sparsit"), (dict(compression="zip"), "compression")],
        backward=False, preconditioned=False, setting=("sparsities", (0.5,), (0.7,)), diagonal=False,
    ),
]


def _newton(cls, **defaults):
    """A Newton method as the contract builds it: deterministic (``seed`` is moot), no weight decay."""
    def make(params, seed=None, weight_decay=0.0, **kw):
        assert weight_decay == 0.0, "Newton methods take an l2 term in the closure's loss"
        return cls(params, **{**defaults, **kw})

    return make


NEWTON_BAD = [(dict(cg_iters=0), "cg_iters"), (dict(cg_iters=2.0), "cg_iters"), (dict(cg_tol=-1e-3), "cg_tol"),
              (dict(damping=-0.1), "damping"), (dict(damping=float("nan")), "damping"), (dict(lr=-1.0), "lr"),
              (dict(line_search="armijo"), "line_search"), (dict(timeout=0), "timeout"),
              (dict(distributed="yes"), "distributed")]

OPTIMIZERS += [
    OptimizerCase("NewtonCG", _newton(NewtonCG, cg_iters=10), bad=NEWTON_BAD, backward=False, preconditioned=False,
                  setting=("cg_iters", 10, 5), diagonal=False),
    OptimizerCase("LocalNewton", _newton(LocalNewton, cg_iters=10, local_steps=2),
                  bad=NEWTON_BAD + [(dict(local_steps=0), "local_steps"), (dict(local_steps="auto"), "local_steps"),
                                    (dict(gradient_correction=1), "gradient_correction")],
                  backward=False, preconditioned=False, setting=("local_steps", 2, 4), diagonal=False),
]


@pytest.fixture(params=OPTIMIZERS, ids=[case.name for case in OPTIMIZERS])
def case(request) -> OptimizerCase:
    """One registered optimizer."""
    return request.param


@pytest.fixture(params=[c for c in OPTIMIZERS if c.diagonal], ids=[c.name for c in OPTIMIZERS if c.diagonal])
def diagonal_case(request) -> OptimizerCase:
    """One registered diagonal-curvature optimizer."""
    return request.param
