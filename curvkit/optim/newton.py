r"""Newton-CG: a line-searched Newton method in ``torch.optim`` form, and on torch.distributed GIANT and LocalNewton.

**One process.** A step evaluates the closure once with its gradient graph kept
(:class:`~curvkit.hessian.ClosureHessianOperator`: loss f, gradient g and Hessian products H v from one
forward pass), solves the damped Newton system by truncated conjugate gradients
(:func:`curvkit.hessian.cg`, one Hessian-vector product per iteration)

.. math:: (H + \lambda I)\, d = -g \quad \text{until } \|g + (H + \lambda I) d\| \le \mathrm{cg\_tol}\,\|g\|
    \text{ or after cg\_iters products,}

and moves to :math:`w + t\,p` with :math:`p = \eta \odot d` (:math:`\eta`: each parameter group's ``lr``,
1 by default; a group with ``lr = 0`` is frozen and left out of the system). The step size is the first
:math:`t \in \{1, 4^{-1}, \dots, 4^{-9}\}` (GIANT's candidates) meeting Armijo's condition

.. math:: f(w + t p) \le f(w) + c\, t\, g^\top p + 4 \epsilon |f(w)|, \qquad c = 10^{-4},

where the last term, four units of rounding of the loss's dtype, lets steps whose decrease is below the
loss's resolution (near the optimum) be taken. The closure is re-evaluated (without graph) at each
candidate, as ``torch.optim.LBFGS`` does. When no candidate passes the parameters stay where they are
(``last_step_size == 0``); ``line_search=False`` always takes :math:`t = 1`. Non-positive curvature:
CG stops at the first direction with :math:`p_k^\top (H + \lambda I) p_k \le 0` and returns its last
iterate, or at the first iteration the negative gradient (Nocedal & Wright, Algorithm 7.1). If
:math:`g^\top p \ge 0`, which only unequal group ``lr`` can cause, the step falls back to
:math:`p = -\eta \odot g`. A loss that is NaN or infinite at a candidate fails that candidate.

**Under torch.distributed** (gloo on CPU, NCCL on GPU; launched by ``torchrun``; one optimizer per rank,
constructed after ``init_process_group`` on identical initial parameters) each rank's closure returns
the loss :math:`f_k` on its own shard and the objective is the mean :math:`f = \frac1W \sum_k f_k`
(weight a rank's loss by its share of the data for unequal shards). Collectives carry float64.

* :class:`NewtonCG` is GIANT (Wang et al. 2018), three all-reduces per step: (1) :math:`g` and
  :math:`f(w)` from :math:`[g_k, f_k(w)]`; (2) the average of the local solutions of
  :math:`(H_k + \lambda I) d_k = -g`; (3) :math:`f` at all ten candidates at once (each rank evaluates its
  :math:`f_k` at every candidate), and Armijo on :math:`f` picks the same :math:`t` on every rank
  (two all-reduces with ``line_search=False``).
* :class:`LocalNewton` (Gupta et al. 2021) runs phases of L local steps: each ``step`` is one Newton-CG
  step on the rank's own objective with a local Armijo search, and the step that completes a phase
  averages the models with one all-reduce, so it returns with every rank holding the same model (a
  consensus point :math:`\bar w`). With ``gradient_correction=True`` the first step of each phase
  all-reduces :math:`[g_k(\bar w), f_k(\bar w)]` (one more round per phase) and the phase minimises
  :math:`\phi_k(v) = f_k(v) - \langle g_k(\bar w) - g(\bar w),\, v - \bar w\rangle`, whose gradient at
  :math:`\bar w` is the global one (as in DANE and SCAFFOLD): the fixed point is the optimum of f, which
  plain averaging of local steps does not reach.

**Adaptive L** (``local_steps="adaptive"``) starts at L = 8 and halves L (down to 1) when a phase
improves the global objective by less than a quarter of what its local steps promised:
:math:`f(\bar w_j) - f(\bar w_{j+1}) < \frac14 \cdot \frac1W \sum_k (\phi_k(\bar w_j) - \phi_k(w_k^{(L)}))`.
The local decreases and :math:`f_k(\bar w_j)` (free: the first local step's loss) ride on the averaging
all-reduce, so L costs no extra round; without correction :math:`f(\bar w_{j+1})` is known at the next
averaging, one phase later; with it, at the correction round that starts the next phase.

**Counting and faults.** ``comm_rounds`` is the number of collectives this optimizer has called and
``comm_bytes`` the bytes of float64 payload this rank contributed to them (a ring all-reduce moves about
:math:`2 (W-1)/W` times that over the wire); ``matvecs`` counts this rank's Hessian-vector products; all
three are saved in ``state_dict()``. Each all-reduce is asynchronous and waited for at most ``timeout``
seconds (None: the process group's timeout), so a rank that dies or hangs makes the others raise
RuntimeError instead of hanging. Recover by restarting every rank from its own last ``state_dict()``
(LocalNewton's differs by rank inside a phase): ``torchrun --max-restarts 3 --nproc-per-node 4 train.py``
restarts the whole group after a failure, and a script that saves ``model.state_dict()`` and
``opt.state_dict()`` per rank and loads them at start-up resumes bit-exactly (same data order, same
world size).
"""

from __future__ import annotations

import datetime
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from .._utils.borrow import require_scalar_loss
from ..hessian import ClosureHessianOperator, cg
from ._resume import require_same_settings
from ._step_hooks import with_torch_step_hooks

STEP_SIZES = tuple(4.0 ** -j for j in range(10))
ARMIJO = 1e-4
ADAPTIVE_START = 8
ADAPTIVE_PROMISE = 0.25

Closure = Callable[[], torch.Tensor]
_OPTIMIZER_WIDE = ("cg_iters", "cg_tol", "damping", "line_search", "local_steps", "gradient_correction")
_CLOSURE_HINT = "return this rank's loss as a 0-dim tensor (a mean reduction), without calling backward"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])


def _place(params: list[torch.Tensor], w: torch.Tensor) -> None:
    """Write the flat float64 ``w`` into ``params`` (cast to their dtypes)."""
    for p, chunk in zip(params, torch.split(w, [p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def _value(closure: Closure) -> float:
    """The closure's loss as a float (NaN or inf included: a candidate that fails the line search)."""
    loss = closure()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        require_scalar_loss(loss, "the closure's loss", hint=_CLOSURE_HINT)
    return float(loss)


def _armijo(value: float, start: float, t: float, slope: float, eps: float) -> bool:
    return value <= start + ARMIJO * t * slope + 4 * eps * abs(start)


class _Collectives:
    """All-reduce means over the default process group: counted, and bounded in time."""

    def __init__(self, timeout: Optional[float], owner: str):
        self.timeout = None if timeout is None else datetime.timedelta(seconds=timeout)
        self.owner = owner
        self.rounds = 0
        self.bytes = 0

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replace ``tensor`` by its mean over ranks (one all-reduce) and return it."""
        work = dist.all_reduce(tensor, async_op=True)
        self.rounds += 1
        self.bytes += tensor.numel() * tensor.element_size()
        within = "within the process group's timeout" if self.timeout is None else f"within {self.timeout}"
        try:
            finished = work.wait() if self.timeout is None else work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.owner}: a torch.distributed all-reduce failed or did not finish {within}: a rank died, "
                f"hangs, or ran a different number of steps ({err}). Restart every rank from its last state_dict "
                "(torchrun --max-restarts)") from err
        if finished is False:
            raise RuntimeError(f"{self.owner}: a torch.distributed all-reduce did not finish {within}")
        return tensor.div_(dist.get_world_size())


class _NewtonOptimizer(torch.optim.Optimizer, ABC):
    """What NewtonCG and LocalNewton share: settings, state, the Newton-CG direction and the line searches."""

    def __init__(self, params, *, lr: float, cg_iters: int, cg_tol: float, damping: float, line_search: bool,
                 distributed: Optional[bool], timeout: Optional[float]):
        _require(isinstance(cg_iters, int) and not isinstance(cg_iters, bool) and cg_iters >= 1,
                 f"cg_iters must be a positive integer (CG iterations, i.e. Hessian-vector products, per step), "
                 f"got {cg_iters!r}")
        _require(_is_number(cg_tol) and cg_tol >= 0,
                 f"cg_tol must be a finite number >= 0 (CG stops at that relative residual), got {cg_tol!r}")
        _require(_is_number(damping) and damping >= 0,
                 f"damping must be a finite number >= 0 (the lambda of (H + lambda I) d = -g), got {damping!r}")
        _require(isinstance(line_search, bool), f"line_search must be True or False, got {line_search!r}")
        _require(distributed is None or isinstance(distributed, bool),
                 f"distributed must be None (when a process group is initialised), True or False, got {distributed!r}")
        _require(timeout is None or (_is_number(timeout) and timeout > 0),
                 f"timeout must be None (the process group's) or a positive number of seconds, got {timeout!r}")
        super().__init__(params, {"lr": lr})
        self.cg_iters, self.cg_tol, self.damping = cg_iters, float(cg_tol), float(damping)
        self.line_search = line_search
        initialised = dist.is_available() and dist.is_initialized()
        if distributed and not initialised:
            raise RuntimeError("distributed=True needs torch.distributed.init_process_group() first")
        self.distributed = initialised if distributed is None else distributed
        self._collectives = _Collectives(timeout, type(self).__name__)
        self.matvecs = 0
        self.last_step_size: Optional[float] = None

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as ``torch.optim.Optimizer`` does; only ``lr`` may differ between groups.

        Raises:
            ValueError: the group's ``lr`` is not a finite number >= 0, or it sets an optimizer-wide setting.
        """
        wide = sorted(set(param_group) & set(_OPTIMIZER_WIDE))
        _require(not wide, f"{wide} are optimizer-wide settings of {type(self).__name__} (one Newton system spans "
                           "all groups): pass them to the constructor; only lr may differ between groups")
        lr = param_group.get("lr", self.defaults["lr"])
        _require(_is_number(lr) and lr >= 0,
                 f"lr must be a finite number >= 0 (it multiplies the Newton step; 0 freezes a group), got {lr!r}")
        super().add_param_group(param_group)

    @property
    def comm_rounds(self) -> int:
        """The number of collective calls this optimizer has made (all-reduces; none without a process group)."""
        return self._collectives.rounds

    @property
    def comm_bytes(self) -> int:
        """The bytes of payload this rank has contributed to those collectives."""
        return self._collectives.bytes

    # ------------------------------------------------------------------ state
    def _settings(self) -> dict:
        return {"cg_iters": self.cg_iters, "cg_tol": self.cg_tol, "damping": self.damping,
                "line_search": self.line_search}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        """Restore what ``_extra_state`` saved."""

    def state_dict(self) -> dict:
        """Torch's state dict plus a ``"curvkit"`` entry: settings, counters and the optimizer's own state."""
        state = super().state_dict()
        state["curvkit"] = {"settings": self._settings(), "matvecs": self.matvecs,
                            "comm_rounds": self.comm_rounds, "comm_bytes": self.comm_bytes, **self._extra_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by the same class with the same optimizer-wide settings.

        Raises:
            ValueError: the state dict was not saved by this class, or with other optimizer-wide settings.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvkit", None)
        _require(extra is not None and "settings" in extra,
                 f"the state dict has no 'curvkit' entry: it was not saved by {type(self).__name__}.state_dict()")
        require_same_settings(extra["settings"], self._settings(), type(self).__name__)
        super().load_state_dict(state_dict)
        self.matvecs = extra["matvecs"]
        self._collectives.rounds, self._collectives.bytes = extra["comm_rounds"], extra["comm_bytes"]
        self._load_extra_state(extra)

    # ------------------------------------------------------------------ analysis
    def preconditioner(self, params: Optional[list[torch.Tensor]] = None) -> None:
        r"""None: a Newton step solves with the Hessian itself, not a diagonal preconditioner.

        :mod:`curvkit.analysis` then reports plain sharpness; there is no :math:`\lambda_{max}(P^{-1} H)`.

        Args:
            params: accepted for the signature of curvkit's other optimizers; unused.

        Returns:
            None.
        """
        return None

    def stability_threshold(self) -> float:
        """``inf``: a line-searched Newton method has no sharpness at which it becomes unstable.

        Gradient descent diverges on a quadratic once sharpness exceeds 2 / lr. The Newton step scales
        with the inverse curvature, and the Armijo search takes only steps that decrease the loss, so
        there is no such threshold (with ``line_search=False`` and lr = 1 the step lands on the minimiser
        of a strongly convex quadratic whatever its sharpness).

        Returns:
            ``float('inf')``.
        """
        return math.inf

    # ------------------------------------------------------------------ step
    @with_torch_step_hooks
    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> torch.Tensor:
        """One Newton-CG step (see the module docstring for what it communicates under torch.distributed).

        Args:
            closure: returns this rank's loss as a scalar tensor computed from the parameters, without
                calling backward; it is called once with autograd on and again for each line-search candidate.

        Returns:
            The closure's loss at the parameters before the step (detached).

        Raises:
            RuntimeError: no closure, or a collective that did not finish within the timeout.
            ValueError: the closure does not return a scalar tensor that requires grad.
            FloatingPointError: the loss is NaN or infinite at the parameters before the step.
        """
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step needs a closure, e.g. "
                               "opt.step(lambda: loss_fn(model(x), y)): the optimizer differentiates it itself "
                               "(no backward inside) and re-evaluates it for the line search")
        params, lrs = self._moving()
        if not params:  # every group frozen (lr = 0 or no parameter requires grad): nothing to solve for
            return require_scalar_loss(closure(), "the closure's loss", hint=_CLOSURE_HINT).detach()
        H = ClosureHessianOperator(params, closure)
        self._update(H, params, lrs, closure)
        return H.loss

    def _moving(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The parameters this step moves (requires_grad, group lr > 0), and their lr as one flat float64 tensor."""
        params, lrs = [], []
        for group in self.param_groups:
            if group["lr"] > 0:
                chosen = [p for p in group["params"] if p.requires_grad]
                params += chosen
                lrs += [torch.full((p.numel(),), float(group["lr"]), dtype=torch.float64, device=p.device)
                        for p in chosen]
        return params, (torch.cat(lrs) if lrs else torch.zeros(0, dtype=torch.float64))

    @abstractmethod
    def _update(self, H: ClosureHessianOperator, params: list[torch.Tensor], lrs: torch.Tensor,
                closure: Closure) -> None:
        """Move ``params`` by one step from the operator H of the closure at the current parameters."""

    def _direction(self, H: ClosureHessianOperator, g: torch.Tensor, lrs: torch.Tensor,
                   average: bool = False) -> tuple[torch.Tensor, float]:
        """The step p = lr * d with (H + damping I) d = -g by CG (d averaged over ranks if ``average``), and g.p."""
        d = cg(H, -g, max_iter=self.cg_iters, tol=self.cg_tol, damping=self.damping).x
        self.matvecs += H.matvecs
        if average:
            d = self._collectives.mean(d)
        p = lrs * d
        slope = float(g @ p)
        if slope >= 0:  # not a descent direction: only unequal group lr can do this
            p = -lrs * g
            slope = float(g @ p)
        return p, slope

    def _local_step(self, H: ClosureHessianOperator, params: list[torch.Tensor], lrs: torch.Tensor,
                    closure: Closure, correction: Optional[torch.Tensor] = None,
                    anchor: Optional[torch.Tensor] = None) -> Optional[float]:
        r"""One Newton-CG step with a local Armijo search on :math:`\phi(v) = f(v) - c^\top (v - \bar w)`.

        ``correction`` c (None: 0) and ``anchor`` :math:`\bar w` are flat float64. Returns :math:`\phi` at the
        new parameters, or None when ``line_search=False`` (not evaluated).
        """
        w0 = _flat(params)
        g, phi0 = H.gradient, float(H.loss)
        offset = 0.0
        if correction is not None:
            g = g - correction
            offset = float(correction @ (w0 - anchor))
            phi0 -= offset
        p, slope = self._direction(H, g, lrs)
        if not self.line_search:
            self._take(params, w0, p, 1.0)
            return None
        cp = 0.0 if correction is None else float(correction @ p)
        eps = torch.finfo(H.loss.dtype).eps
        for t in STEP_SIZES:
            _place(params, w0 + t * p)
            phi = _value(closure) - (offset + t * cp)
            if _armijo(phi, phi0, t, slope, eps):
                self.last_step_size = t
                return phi
        self._take(params, w0, p, 0.0)
        return phi0

    def _global_step(self, f0: float, g: torch.Tensor, H: ClosureHessianOperator, params: list[torch.Tensor],
                     lrs: torch.Tensor, closure: Closure) -> None:
        """GIANT's step from the global f0 and g: averaged local directions, one all-reduce of all candidates."""
        p, slope = self._direction(H, g, lrs, average=True)
        w0 = _flat(params)
        if not self.line_search:
            self._take(params, w0, p, 1.0)
            return
        values = []
        for t in STEP_SIZES:
            _place(params, w0 + t * p)
            values.append(_value(closure))
        values = self._collectives.mean(torch.tensor(values, dtype=torch.float64, device=w0.device)).tolist()
        eps = torch.finfo(H.loss.dtype).eps
        chosen = next((t for t, v in zip(STEP_SIZES, values) if _armijo(v, f0, t, slope, eps)), 0.0)
        self._take(params, w0, p, chosen)

    def _take(self, params: list[torch.Tensor], w0: torch.Tensor, p: torch.Tensor, t: float) -> None:
        _place(params, w0 + t * p if t else w0)
        self.last_step_size = t


class NewtonCG(_NewtonOptimizer):
    r"""Newton-CG with an Armijo line search; GIANT under torch.distributed.

    Without a process group (or with ``distributed=False``) a step is one damped Newton-CG step on the
    closure's loss with an Armijo search over :math:`t \in \{1, 4^{-1}, \dots, 4^{-9}\}`: a full-batch
    optimizer for small and medium problems that converges quadratically near a strongly convex minimum
    when CG solves accurately. Under torch.distributed it is GIANT: three all-reduces per step (gradient
    and loss; averaged local directions; the losses at all candidates). See the module docstring.

    >>> x, y = torch.randn(64, 3), (torch.rand(64) < 0.5).float()
    >>> model = nn.Linear(3, 1)
    >>> def closure():
    ...     return F.binary_cross_entropy_with_logits(model(x)[:, 0], y) + 0.01 * model.weight.square().sum()
    >>> opt = NewtonCG(model.parameters())
    >>> for _ in range(5):
    ...     loss = opt.step(closure)
    >>> max(float(g.abs().max()) for g in torch.autograd.grad(closure(), list(model.parameters()))) < 1e-5
    True

    Args:
        params: parameters or parameter groups; only ``lr`` may differ between groups.
        cg_iters: at most this many CG iterations (Hessian-vector products) per step.
        cg_tol: CG stops at this relative residual.
        damping: :math:`\lambda \ge 0` added to the Hessian's diagonal in the Newton system.
        line_search: Armijo search (True) or the full step :math:`t = 1` (False).
        lr: multiplies the Newton step before the line search (per group; 0 freezes a group).
        distributed: GIANT over torch.distributed ranks (None: when a process group is initialised).
        timeout: seconds a collective may take before a dead or hung rank is reported (None: the process
            group's timeout).

    Raises:
        ValueError: a setting out of range (the message says which and what it must be).
        RuntimeError: ``distributed=True`` without an initialised process group.
    """

    def __init__(self, params, cg_iters: int = 20, cg_tol: float = 1e-4, damping: float = 0.0,
                 line_search: bool = True, *, lr: float = 1.0, distributed: Optional[bool] = None,
                 timeout: Optional[float] = None):
        super().__init__(params, lr=lr, cg_iters=cg_iters, cg_tol=cg_tol, damping=damping, line_search=line_search,
                         distributed=distributed, timeout=timeout)

    def _update(self, H, params, lrs, closure) -> None:
        if not self.distributed:
            self._local_step(H, params, lrs, closure)
            return
        reduced = self._collectives.mean(torch.cat([H.gradient, H.gradient.new_tensor([float(H.loss)])]))
        self._global_step(float(reduced[-1]), reduced[:-1], H, params, lrs, closure)


class LocalNewton(_NewtonOptimizer):
    r"""LocalNewton: L local Newton-CG steps per rank between model averagings; Newton-CG in one process.

    Under torch.distributed each ``step(closure)`` is one Newton-CG step with a local Armijo search on
    the rank's own loss; every ``local_steps``-th step ends by averaging the models over ranks (one
    all-reduce), so it returns with every rank holding the same model. ``local_steps="adaptive"`` starts
    at L = 8 and halves L when a phase improves the global loss by less than a quarter of its local
    steps' decrease (no extra round). ``gradient_correction=True`` adds one all-reduce of the gradient at
    the start of each phase and makes the local steps minimise
    :math:`f_k(v) - \langle g_k(\bar w) - g(\bar w), v - \bar w\rangle`, which converges to the exact
    optimum; plain LocalNewton stalls where averaged local optima are not the optimum. Without a process
    group (or with ``distributed=False``) it is :class:`NewtonCG`'s single-process step. Each rank must save
    and load its own ``state_dict()``: between averagings the ranks' states differ. See the module docstring.

    .. code-block:: python

        # torchrun --nproc-per-node 4 train.py; x, y: this rank's shard
        opt = LocalNewton(model.parameters(), local_steps="adaptive", gradient_correction=True)
        for _ in range(40):
            opt.step(lambda: F.cross_entropy(model(x), y))
        opt.comm_rounds, opt.local_steps

    Args:
        params: parameters or parameter groups; only ``lr`` may differ between groups.
        local_steps: L, a positive int, or ``"adaptive"``.
        gradient_correction: correct the local objectives by the global gradient at each averaged model.
        cg_iters: at most this many CG iterations (Hessian-vector products) per step.
        cg_tol: CG stops at this relative residual.
        damping: :math:`\lambda \ge 0` added to the Hessian's diagonal in the Newton system.
        line_search: local Armijo search (True) or the full step :math:`t = 1` (False).
        lr: multiplies the Newton step before the line search (per group; 0 freezes a group).
        distributed: run over torch.distributed ranks (None: when a process group is initialised).
        timeout: seconds a collective may take before a dead or hung rank is reported (None: the process
            group's timeout).

    Raises:
        ValueError: a setting out of range (the message says which and what it must be).
        RuntimeError: ``distributed=True`` without an initialised process group.
    """

    def __init__(self, params, local_steps: Union[int, str] = "adaptive", gradient_correction: bool = False,
                 cg_iters: int = 20, cg_tol: float = 1e-4, damping: float = 0.0, line_search: bool = True, *,
                 lr: float = 1.0, distributed: Optional[bool] = None, timeout: Optional[float] = None):
        _require(local_steps == "adaptive" or (isinstance(local_steps, int) and not isinstance(local_steps, bool)
                                               and local_steps >= 1),
                 f"local_steps must be a positive integer (local steps between averagings) or 'adaptive', "
                 f"got {local_steps!r}")
        _require(isinstance(gradient_correction, bool),
                 f"gradient_correction must be True or False, got {gradient_correction!r}")
        super().__init__(params, lr=lr, cg_iters=cg_iters, cg_tol=cg_tol, damping=damping, line_search=line_search,
                         distributed=distributed, timeout=timeout)
        self.adaptive = local_steps == "adaptive"
        self.gradient_correction = gradient_correction
        self._local_steps = ADAPTIVE_START if self.adaptive else local_steps
        self._phase_step = 0       # local steps taken since the last averaging
        self._anchor: Optional[torch.Tensor] = None      # the consensus model the phase started from
        self._correction: Optional[torch.Tensor] = None  # g_k(anchor) - g(anchor)
        self._start_loss = 0.0     # this rank's loss at the anchor
        self._pending: Optional[tuple[float, float]] = None  # (f(anchor), mean local decrease) of a phase to judge

    @property
    def local_steps(self) -> int:
        """L: the number of local steps in the current phase (one process: fixed, unused)."""
        return self._local_steps

    @property
    def phase_step(self) -> int:
        """Local steps taken since the last averaging: 0 right after one, when every rank holds the same model."""
        return self._phase_step

    def _settings(self) -> dict:
        return {**super()._settings(), "local_steps": "adaptive" if self.adaptive else self._local_steps,
                "gradient_correction": self.gradient_correction}

    def _extra_state(self) -> dict:
        return {"L": self._local_steps, "phase_step": self._phase_step, "anchor": self._anchor,
                "correction": self._correction, "start_loss": self._start_loss, "pending": self._pending}

    def _load_extra_state(self, extra: dict) -> None:
        self._local_steps, self._phase_step = extra["L"], extra["phase_step"]
        self._anchor, self._correction = extra["anchor"], extra["correction"]
        self._start_loss, self._pending = extra["start_loss"], extra["pending"]

    def _update(self, H, params, lrs, closure) -> None:
        if not self.distributed:
            self._local_step(H, params, lrs, closure)
            return
        if self._phase_step == 0:
            self._anchor, self._start_loss = _flat(params), float(H.loss)
            if self.gradient_correction:
                reduced = self._collectives.mean(torch.cat([H.gradient, H.gradient.new_tensor([self._start_loss])]))
                self._correction = H.gradient - reduced[:-1]
                self._judge(float(reduced[-1]))
        phi = self._local_step(H, params, lrs, closure, self._correction, self._anchor)
        self._phase_step += 1
        if self._phase_step >= self._local_steps:
            if phi is None:  # line_search=False: the local objective at the phase's end is not known yet
                phi = _value(closure) - (0.0 if self._correction is None
                                         else float(self._correction @ (_flat(params) - self._anchor)))
            self._average(params, self._start_loss - phi)

    def _average(self, params: list[torch.Tensor], decrease: float) -> None:
        """Average the models (one all-reduce carrying f_k(anchor) and the phase's local decrease too)."""
        reduced = self._collectives.mean(torch.cat([_flat(params), params[0].new_tensor(
            [self._start_loss, decrease], dtype=torch.float64)]))
        _place(params, reduced[:-2])
        start_loss, decrease = float(reduced[-2]), float(reduced[-1])
        self._judge(start_loss)
        self._pending = (start_loss, decrease)
        self._phase_step = 0

    def _judge(self, consensus_loss: float) -> None:
        """The global loss at the latest consensus model is known: judge the phase that ended there (adaptive L)."""
        if self._pending is not None and self.adaptive:
            start_loss, promised = self._pending
            if start_loss - consensus_loss < ADAPTIVE_PROMISE * promised:
                self._local_steps = max(1, self._local_steps // 2)
        self._pending = None
