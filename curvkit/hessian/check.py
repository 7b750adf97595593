r"""A finite-difference check of an operator's products: are they the curvature they claim to be?

Autograd computes Hessian-vector products by differentiating the backward pass. An operation whose
backward is not itself differentiable in the right way (a custom ``autograd.Function`` with a
``@once_differentiable`` backward, or one that treats a saved tensor as a constant) either raises an
error or silently drops second-order terms: the products are then wrong with no warning. First
derivatives do not have this problem, so :func:`check` compares the products with central
differences of first derivatives.
"""

from __future__ import annotations

from typing import Any

import torch

from .._utils.random import Seed, gaussian, make_generator
from .operator import check_operator
from .results import CheckResult


def check(H: Any, seed: Seed = 0, *, probes: int = 3, tol: float | None = None) -> CheckResult:
    r"""Compare ``H``'s products with finite differences of first derivatives on random probes.

    For unit Gaussian probes :math:`v_1, \dots, v_k` it computes :math:`H v_j` and a reference from
    ``H.finite_differences``, which for the Hessian is the central difference of the gradient g of
    the data-averaged loss,

    .. math:: D_s v = \frac{g(\theta + s v) - g(\theta - s v)}{2 s}
              = H v + c\, s^2 + O(s^4), \qquad s = \epsilon^{1/3} \max(1, \lVert\theta\rVert),

    (for the GGN, :math:`J^\top H_{\mathrm{out}} J v` with J v and :math:`H_{\mathrm{out}}(Jv)` both by
    central differences, see :class:`~curvkit.hessian.GGNOperator`), extrapolated to
    :math:`R v = (4 D_{s/2} v - D_s v) / 3`, which cancels the :math:`s^2` term (Richardson). The step
    perturbs the parameters by a relative :math:`\epsilon^{1/3}` (machine epsilon of ``H.dtype``): the
    rounding error :math:`O(\epsilon / s)` is then about :math:`\epsilon^{2/3}` relative (4e-11 in
    float64, 2e-5 in float32) and the truncation error :math:`O(s^4)` smaller still. The reported error is

    .. math:: \mathrm{rel\_error} = \max_j \frac{\lVert H v_j - R v_j \rVert}
              {\max(\lVert H v_j \rVert, \lVert R v_j \rVert)}

    (0 for a probe where both vanish), and ``ok`` is ``rel_error <= tol``. The default tolerance
    :math:`\epsilon^{1/3}` (6e-6 in float64, 5e-3 in float32) leaves a factor of about
    :math:`\epsilon^{-1/3}` for badly scaled or strongly curved models, and still flags any product
    that drops a second-order term (typically tens of percent off). Costs four gradients (or, for the
    GGN, six forward passes and two vector-Jacobian products) per probe and batch; the probes'
    products count in ``H.matvecs``.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> from curvkit.hessian import HessianOperator
    >>> check(HessianOperator(model, F.cross_entropy, (x, y)), seed=0).ok
    True

    Args:
        H: an operator of a model's loss with ``finite_differences`` (:class:`~curvkit.hessian.HessianOperator`,
            :class:`~curvkit.hessian.GGNOperator`).
        seed: an int, a ``torch.Generator`` or None for the probes.
        probes: the number of random probes.
        tol: the largest acceptable ``rel_error`` (default :math:`\epsilon^{1/3}` of ``H.dtype``).

    Returns:
        A :class:`~curvkit.hessian.CheckResult` ``(rel_error, tol, ok, probes, step)``.

    Raises:
        TypeError: ``H`` has no ``finite_differences`` (a dense matrix or a composition: check the model
            operator inside it).
        ValueError: ``probes`` is not a positive integer or ``tol`` is not positive.
    """
    n = check_operator(H)
    if not callable(getattr(H, "finite_differences", None)):
        raise TypeError(f"check needs an operator of a model's loss with finite_differences (HessianOperator, "
                        f"GGNOperator), got {type(H).__name__}; a dense matrix or a composition has no first "
                        "derivatives to difference: check the model operator inside it")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    step = torch.finfo(H.dtype).eps ** (1 / 3)
    tol = step if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    V = gaussian(n, probes, make_generator(seed, shared=getattr(H, "distributed", False)), H.device)
    V = V / torch.linalg.vector_norm(V, dim=0)
    products = (H @ V).to(torch.float64)
    reference = (4 * H.finite_differences(V, step / 2) - H.finite_differences(V, step)).to(torch.float64) / 3
    scale = torch.maximum(torch.linalg.vector_norm(products, dim=0), torch.linalg.vector_norm(reference, dim=0))
    error = torch.linalg.vector_norm(products - reference, dim=0)
    rel_error = float(torch.where(scale > 0, error / scale, torch.zeros_like(scale)).max())
    return CheckResult(rel_error=rel_error, tol=tol, ok=rel_error <= tol, probes=probes, step=step)
