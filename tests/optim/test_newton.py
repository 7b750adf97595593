"""NewtonCG and LocalNewton against exact answers: hand-computed steps, scipy's optimum, dense GIANT on shards.

The distributed checks share one run of three gloo ranks (forked, one thread each): GIANT, adaptive
LocalNewton, gradient-corrected LocalNewton with a resume, the collectives counted by wrappers around
torch.distributed, and finally one rank killed while the others step.
"""

from __future__ import annotations

import copy
import datetime
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from curvkit.optim import LocalNewton, NewtonCG
from curvkit.optim.newton import ADAPTIVE_PROMISE, ARMIJO, STEP_SIZES

DIM, SAMPLES, RANKS, LAM = 4, 1500, 3, 0.1
EXACT = dict(cg_iters=5, cg_tol=1e-13)  # CG solves the 5 x 5 Newton systems exactly


# ------------------------------------------------------------------------------------------ problems


def _data():
    """Logistic-regression data sorted by label plus noise: the three shards are mildly label-skewed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, DIM, generator=g, dtype=torch.float64)
    logits = x @ torch.tensor([1.5, -2.0, 0.5, 1.0], dtype=torch.float64) + 0.5
    y = (torch.rand(SAMPLES, generator=g, dtype=torch.float64) < torch.sigmoid(logits)).double()
    order = torch.argsort(y + 4.0 * torch.rand(SAMPLES, generator=g, dtype=torch.float64), stable=True)
    return x[order], y[order]


def _shard(rank):
    x, y = _data()
    size = SAMPLES // RANKS
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def _model():
    model = nn.Linear(DIM, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.0]]))
        model.bias.fill_(-0.1)
    return model


def _loss(model, x, y):
    """Mean logistic loss plus (LAM / 2) ||theta||^2: equal shards average to the full-data objective."""
    return (F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
            + LAM / 2 * (model.weight.square().sum() + model.bias.square().sum()))


def _theta_loss(theta, x, y):
    z = x @ theta[:DIM] + theta[DIM]
    return (F.softplus(z) - y * z).mean() + LAM / 2 * theta @ theta


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _scipy_optimum(x, y):
    from scipy.optimize import minimize

    def fun(theta):
        t = torch.tensor(theta, requires_grad=True)
        value = _theta_loss(t, x, y)
        return float(value.detach()), torch.autograd.grad(value, t)[0].numpy()

    def hess(theta):
        return torch.autograd.functional.hessian(lambda t: _theta_loss(t, x, y), torch.tensor(theta)).numpy()

    res = minimize(fun, _flat(_model()).numpy(), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-14})
    return torch.tensor(res.x), res.fun


# ------------------------------------------------------------------------------------ one process


def test_a_strongly_convex_quadratic_is_solved_in_one_step_with_exact_cg():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = (Q * torch.logspace(-1, 2, 6, dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    calls = []

    def closure():
        calls.append(1)
        return 0.5 * w @ A @ w - b @ w

    opt = NewtonCG([w], cg_iters=6, cg_tol=1e-14)
    loss = opt.step(closure)
    torch.testing.assert_close(w.detach(), torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert float(loss) == 0.0 and opt.last_step_size == 1.0 and len(calls) == 2  # the graph call, one candidate
    assert opt.matvecs <= 6 and opt.comm_rounds == 0 and w.grad is None

    w2 = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    damped = NewtonCG([w2], cg_iters=6, cg_tol=1e-14, damping=0.5, line_search=False, lr=0.5)
    damped.step(lambda: 0.5 * w2 @ A @ w2 - b @ w2)
    torch.testing.assert_close(w2.detach(), 0.5 * torch.linalg.solve(A + 0.5 * torch.eye(6), b), rtol=1e-9, atol=1e-10)


def test_logistic_regression_reaches_scipys_optimum_to_1e_10():
    x, y = _data()
    theta_star, f_star = _scipy_optimum(x, y)
    for cls in (NewtonCG, LocalNewton):  # without a process group LocalNewton is the same Newton-CG
        model = _model()
        opt = cls(model.parameters(), **EXACT)
        losses = [float(opt.step(lambda: _loss(model, x, y))) for _ in range(8)]
        torch.testing.assert_close(_flat(model), theta_star, rtol=1e-10, atol=1e-10)
        assert abs(float(_loss(model, x, y).detach()) - f_star) <= 1e-12 * f_star
        assert all(a >= b for a, b in zip(losses, losses[1:])) and opt.last_step_size == 1.0


def test_negative_curvature_at_the_first_cg_iteration_steps_along_the_negative_gradient():
    w = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    opt = NewtonCG([w])
    opt.step(lambda: (-0.5 * w ** 2 + 0.25 * w ** 4).sum())   # f'' = -0.97 < 0 at 0.1; -f' = 0.099
    assert w.item() == pytest.approx(0.199, abs=1e-15) and opt.last_step_size == 1.0


def test_the_line_search_backtracks_by_quarters_and_rejects_non_finite_losses():
    w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = NewtonCG([w])
    opt.step(lambda: (1 + w ** 2).sqrt().sum())               # Newton step -w (1 + w^2) = -10 overshoots to -8
    assert w.item() == pytest.approx(-0.5, abs=1e-15) and opt.last_step_size == 0.25
    v = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    nan_above_one = lambda: torch.where(v > 1, float("nan"), (v - 3) ** 2).sum()  # noqa: E731
    NewtonCG([v]).step(nan_above_one)                          # t = 1 lands on 3: NaN, fails; t = 1/4: 0.75
    assert v.item() == pytest.approx(0.75, abs=1e-15)
    u = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    nan_off_zero = lambda: torch.where(u == 0, (u - 3) ** 2, float("nan")).sum()  # noqa: E731
    nowhere = NewtonCG([u])
    nowhere.step(nan_off_zero)                                 # every candidate fails: the parameters stay
    assert u.item() == 0.0 and nowhere.last_step_size == 0.0
    flat = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    stuck = NewtonCG([flat], line_search=True)
    stuck.step(lambda: (flat - 1).square().sum() + 1.0)        # at the minimum: the step is zero, t = 1 passes
    assert flat.item() == 1.0 and stuck.last_step_size == 1.0


def test_bad_input_is_refused_with_what_to_do():
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(FloatingPointError, match="nan"):
        NewtonCG([w]).step(lambda: (w * float("nan")).sum())
    with pytest.raises(FloatingPointError, match="inf"):
        LocalNewton([w]).step(lambda: (w * float("inf")).sum())
    with pytest.raises(RuntimeError, match="closure"):
        LocalNewton([w]).step()
    with pytest.raises(ValueError, match="scalar"):
        NewtonCG([w]).step(lambda: w * 2)
    with pytest.raises(ValueError, match="does not require grad"):
        NewtonCG([w]).step(lambda: w.sum().detach())
    with pytest.raises(ValueError, match="optimizer-wide"):
        NewtonCG([{"params": [w], "damping": 1.0}])
    with pytest.raises(RuntimeError, match="init_process_group"):
        LocalNewton([w], distributed=True)
    with pytest.raises(ValueError, match="curvkit"):
        NewtonCG([w]).load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())
    frozen = NewtonCG([w], lr=0.0)
    assert float(frozen.step(lambda: w.square().sum())) == 2.0 and w.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------- references for the ranks


def _giant_reference(steps):
    """GIANT by dense linear algebra: mean gradient, mean of the local Newton solutions, Armijo on the mean loss."""
    shards = [_shard(k) for k in range(RANKS)]
    theta = _flat(_model())
    path = []
    for _ in range(steps):
        losses, grads, dirs = [], [], []
        for x, y in shards:
            t = theta.clone().requires_grad_()
            value = _theta_loss(t, x, y)
            losses.append(float(value.detach()))
            grads.append(torch.autograd.grad(value, t)[0])
        g, f0 = torch.stack(grads).mean(0), sum(losses) / RANKS
        for x, y in shards:
            H = torch.autograd.functional.hessian(lambda t: _theta_loss(t, x, y), theta)
            dirs.append(torch.linalg.solve(H, -g))
        p = torch.stack(dirs).mean(0)
        for step in STEP_SIZES:
            trial = sum(float(_theta_loss(theta + step * p, x, y)) for x, y in shards) / RANKS
            if trial <= f0 + ARMIJO * step * float(g @ p) + 4 * torch.finfo(torch.float64).eps * abs(f0):
                theta = theta + step * p
                break
        path.append(theta)
    return path


def _local_newton_reference(phases):
    """Adaptive LocalNewton by hand: per shard single-process Newton-CG steps, averaging, and the L rule."""
    shards = [_shard(k) for k in range(RANKS)]
    consensus, L, pending, out = _model(), 8, None, []
    for _ in range(phases):
        models, starts, decreases = [], [], []
        for x, y in shards:
            model = copy.deepcopy(consensus)
            opt = NewtonCG(model.parameters(), **EXACT)
            start = float(opt.step(lambda: _loss(model, x, y)))
            for _ in range(L - 1):
                opt.step(lambda: _loss(model, x, y))
            models.append(model)
            starts.append(start)
            decreases.append(start - float(_loss(model, x, y).detach()))
        start, promised = sum(starts) / RANKS, sum(decreases) / RANKS
        if pending is not None and pending[0] - start < ADAPTIVE_PROMISE * pending[1]:
            L = max(1, L // 2)  # judged with one phase of delay: f at a consensus model is known one averaging later
        pending = (start, promised)
        with torch.no_grad():
            for p, *qs in zip(consensus.parameters(), *(m.parameters() for m in models)):
                p.copy_(torch.stack(qs).mean(0))
        out.append((_flat(consensus), L))
    return out


# ------------------------------------------------------------------------------------ the ranks


COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "barrier", "broadcast_object_list", "send", "recv", "isend", "irecv")


def _count_collectives():
    """Wrap every torch.distributed collective and point-to-point call; return the running count."""
    count = [0]
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            count[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return count


def _run(opt, model, closure, steps):
    out = []
    for _ in range(steps):
        opt.step(closure)
        phase = (opt.local_steps, opt.phase_step) if isinstance(opt, LocalNewton) else (None, None)
        out.append((_flat(model), phase[0], opt.comm_rounds, phase[1]))
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=datetime.timedelta(seconds=60))
    count = _count_collectives()
    x, y = _shard(rank)
    res = {}

    model = _model()
    opt, before = NewtonCG(model.parameters(), **EXACT), count[0]
    res["giant"] = _run(opt, model, lambda: _loss(model, x, y), 3)
    res["giant_counts"] = (opt.comm_rounds, count[0] - before, opt.comm_bytes)

    model = _model()
    opt, before = LocalNewton(model.parameters(), **EXACT), count[0]
    res["adaptive"] = _run(opt, model, lambda: _loss(model, x, y), 8 + 8 + 8 + 4 + 4)
    res["adaptive_counts"] = (opt.comm_rounds, count[0] - before, opt.comm_bytes)

    model = _model()
    opt, before = LocalNewton(model.parameters(), local_steps=2, gradient_correction=True, **EXACT), count[0]
    res["corrected"] = _run(opt, model, lambda: _loss(model, x, y), 5)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    res["corrected"] += _run(opt, model, lambda: _loss(model, x, y), 11)
    res["corrected_counts"] = (opt.comm_rounds, count[0] - before, opt.comm_bytes)
    resumed = _model()
    resumed.load_state_dict(saved[0])
    opt = LocalNewton(resumed.parameters(), local_steps=2, gradient_correction=True, **EXACT)
    opt.load_state_dict(saved[1])
    res["resumed"] = _run(opt, resumed, lambda: _loss(resumed, x, y), 11)

    model = _model()
    opt = LocalNewton(model.parameters(), local_steps=2, line_search=False, **EXACT)
    res["full_steps"] = _run(opt, model, lambda: _loss(model, x, y), 2)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))

    model = _model()  # a rank dies while the others step: they must raise, not hang
    opt = NewtonCG(model.parameters(), timeout=10.0)
    if rank == RANKS - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.time()
    try:
        opt.step(lambda: _loss(model, x, y))
        outcome = "no error"
    except RuntimeError as err:
        outcome = str(err)
    torch.save((time.time() - start, outcome), os.path.join(out_dir, f"killed{rank}.pt"))
    os._exit(0)  # the process group is broken: skip its teardown


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("newton")
    context = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=RANKS, join=False, start_method="fork")
    for process in context.processes:
        process.join(120)
    codes = [process.exitcode for process in context.processes]
    assert codes == [0] * (RANKS - 1) + [-signal.SIGKILL], codes
    return [torch.load(out / f"rank{r}.pt") for r in range(RANKS)], [torch.load(out / f"killed{r}.pt")
                                                                      for r in range(RANKS - 1)]


def test_newton_cg_on_ranks_is_giant(ranks):
    results, _ = ranks
    for step, reference in enumerate(_giant_reference(3)):
        assert all(torch.equal(r["giant"][step][0], results[0]["giant"][step][0]) for r in results)
        torch.testing.assert_close(results[0]["giant"][step][0], reference, rtol=1e-10, atol=1e-12)


def test_local_newton_ranks_agree_at_consensus_and_follow_averaged_local_newton(ranks):
    results, _ = ranks
    trace = results[0]["adaptive"]
    syncs = [i for i in range(len(trace)) if trace[i][2] > (trace[i - 1][2] if i else 0)]
    assert syncs == [7, 15, 23, 27, 29, 30, 31]  # L = 8, 8, 8, then halved phase by phase once the phases stall
    for i in range(len(trace)):
        same = all(torch.equal(r["adaptive"][i][0], trace[i][0]) for r in results)
        assert same == (i in syncs) == (trace[i][3] == 0), i  # identical exactly at consensus (phase_step 0)
    reference = _local_newton_reference(len(syncs))
    for i, (theta, L) in zip(syncs, reference):
        torch.testing.assert_close(trace[i][0], theta, rtol=1e-10, atol=1e-12)
        assert trace[i][1] == L
    theta_star, _ = _scipy_optimum(*_data())
    assert (trace[-1][0] - theta_star).norm() > 1e-2   # plain LocalNewton stalls away from the optimum


def test_local_newton_without_line_search_averages_full_local_newton_steps(ranks):
    results, _ = ranks
    models = []
    for k in range(RANKS):
        x, y = _shard(k)
        model = _model()
        opt = NewtonCG(model.parameters(), line_search=False, **EXACT)
        for _ in range(2):
            opt.step(lambda: _loss(model, x, y))
        models.append(_flat(model))
    assert results[0]["full_steps"][1][2] == 1
    torch.testing.assert_close(results[0]["full_steps"][1][0], torch.stack(models).mean(0), rtol=1e-12, atol=1e-14)


def test_gradient_corrected_local_newton_reaches_the_optimum_and_resumes_bit_exactly(ranks):
    results, _ = ranks
    theta_star, _ = _scipy_optimum(*_data())
    final = results[0]["corrected"][-1][0]
    assert all(torch.equal(r["corrected"][-1][0], final) for r in results)
    torch.testing.assert_close(final, theta_star, rtol=1e-9, atol=1e-9)
    for r in results:
        assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(r["corrected"][5:], r["resumed"]))


def test_comm_rounds_count_every_collective_call(ranks):
    results, _ = ranks
    n = DIM + 1
    for r in results:
        assert r["giant_counts"] == (3 * 3, 3 * 3, 3 * 8 * ((n + 1) + n + len(STEP_SIZES)))
        assert r["adaptive_counts"] == (7, 7, 7 * 8 * (n + 2))
        assert r["corrected_counts"] == (16, 16, 8 * 8 * ((n + 1) + (n + 2)))


def test_a_killed_rank_makes_the_others_raise(ranks):
    _, killed = ranks
    for elapsed, outcome in killed:
        assert "all-reduce failed or did not finish" in outcome and "--max-restarts" in outcome
        assert elapsed < 15
