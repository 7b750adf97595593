"""curvkit.attacks.trust_region against torchattacks (CW, DeepFool, PGD, FGSM) and foolbox (DDN, FMN) on digits.

sklearn's 8x8 digits with pixels in [0, 1] (the data's grid is 1/16); three classifiers trained with Adam: a ReLU
MLP, a small CNN and a tanh MLP (twice differentiable with a non-zero input Hessian, for the second-order attack);
the first 300 correctly classified test points of each. One process, one thread.

For each model and confidence kappa (0 and 0.5) the tables give: success (the best wrong logit beats the true one,
strictly, by at least kappa, at the returned point, in [0, 1]); median L2 and Linf norms over the points broken by
every minimum-norm attack that broke at least half of them (in parentheses for the others: over their own broken
points; PGD and FGSM are fixed-budget attacks, their norm is their budget); CPU seconds (the median of 3 runs for
attacks that take under a second); model passes per example (forward plus backward passes through the model,
counted by a wrapper for the anchors and by the result's own ``passes`` for curvkit, whose batched backward over the
k candidate classes counts k; the second-order attack's Hessian-vector products apart); and the share of broken points
still misclassified after rounding to the 1/16 grid. DeepFool, DDN, FMN, PGD and FGSM have no confidence margin:
their adversarial examples are computed once per model and judged at both kappas.

Anchors: torchattacks CW (100 steps, lr 0.01, kappa = kappa, c = 1 and 10) as shipped and repaired (its margin takes
the best wrong logit instead of max((1 - onehot) z), which is 0 when every wrong logit is negative; the atanh start
is clamped so that pixels at exactly 0 or 1 can move; the best-so-far point must reach margin kappa, not only be
misclassified); DeepFool (50 steps, overshoot 0.02); PGD-L2 / PGD-Linf (10 steps, step eps/4, random start) and FGSM
at eps = curvkit's median L2 / Linf norm at kappa = 0 on that model; foolbox DDN and FMN (L2, Linf), 100 steps.
A missing or broken anchor prints ``n/a (reason)``.

    pip install -c constraints.txt --no-deps torchattacks   # its declared torchvision dependency is not needed
    pip install -c constraints.txt foolbox
    python benchmarks/attacks.py            # about 2 minutes of CPU time on one thread
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before torch loads libgomp: spinning OpenMP workers distort timings on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# This checkout's curvkit, wherever an editable install happens to point.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import adam_pretrain, digits_cnn
from torch import nn

from curvkit.attacks import trust_region
from curvkit.datasets import load_digits_tensors

POINTS = 300
KAPPAS = (0.0, 0.5)
GRID = 16
SUCCESS_TARGET = 0.99
NORM_TARGET = 0.8      # median L2 <= 0.8x repaired CW (c = 10) on the points both broke, at kappa = 0.5
TIME_TARGET = 0.25     # CPU time <= 0.25x repaired CW (c = 10)
FAILURES = (ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, RuntimeError, TypeError,
            ValueError)


# --------------------------------------------------------------------------------------------- models


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


cnn = digits_cnn


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


MODELS = {"MLP 64-64-10 ReLU": relu_mlp, "CNN conv8-conv16-avgpool-linear": cnn, "MLP 64-32-10 tanh": tanh_mlp}
SECOND_ORDER = {"MLP 64-32-10 tanh"}


def train(factory: Callable[[], nn.Module], data, epochs: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return adam_pretrain(factory(), data, epochs, seed)


class Counted(nn.Module):
    """The model, counting the rows of every forward pass and of every backward pass through its output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.rows += len(x)
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad: torch.Tensor) -> None:
        self.rows += len(grad)


# --------------------------------------------------------------------------------------------- attacks

# An attack maps (model, x, y, kappa) to adversarial examples, or to a result with .adversarial and .products.
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], object]


def curvkit_tr(norm: str, order: int) -> Attack:
    return lambda model, x, y, kappa: trust_region(model, x, y, norm=norm, order=order, confidence=kappa)


def on_images(make: Callable[[nn.Module, float], Callable]) -> Attack:
    """Run a torchattacks attack on (N, 1, 8, 8) images, the layout it expects (PGD-L2 and DeepFool need it)."""
    def attack(model, x, y, kappa):
        images = x.view(len(x), 1, 8, 8)
        return make(nn.Sequential(nn.Flatten(), model).eval(), kappa)(images, y).reshape(len(x), -1)
    return attack


def torchattacks_cw(c: float, repaired: bool) -> Attack:
    def make(model, kappa):
        import torchattacks

        cls = repaired_cw() if repaired else torchattacks.CW
        return cls(model, c=c, kappa=kappa, steps=100, lr=0.01)
    return on_images(make)


def repaired_cw():
    """torchattacks CW with its margin, its atanh start and its best-so-far rule repaired (nothing else changed)."""
    import torchattacks

    class RepairedCW(torchattacks.CW):
        def inverse_tanh_space(self, x):
            return self.atanh(torch.clamp(x * 2 - 1, min=-1 + 1e-6, max=1 - 1e-6))

        def f(self, outputs, labels):
            true = outputs.gather(1, labels[:, None])[:, 0]
            other = outputs.scatter(1, labels[:, None], -torch.inf).amax(1)
            return torch.clamp(true - other, min=-self.kappa)

        def forward(self, images, labels):
            w = self.inverse_tanh_space(images).detach().requires_grad_()
            best, best_l2 = images.clone(), torch.full((len(images),), torch.inf)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            prev_cost = math.inf
            for step in range(self.steps):
                adv = self.tanh_space(w)
                l2 = (adv - images).pow(2).flatten(1).sum(1)
                outputs = self.get_logits(adv)
                cost = l2.sum() + self.c * self.f(outputs, labels).sum()
                optimizer.zero_grad()
                cost.backward()
                optimizer.step()
                logits = outputs.detach()
                gap = logits.scatter(1, labels[:, None], -torch.inf).amax(1) - logits.gather(1, labels[:, None])[:, 0]
                better = (gap > 0) & (gap >= self.kappa) & (l2.detach() < best_l2)
                best_l2 = torch.where(better, l2.detach(), best_l2)
                best = torch.where(better.view(-1, *[1] * (images.dim() - 1)), adv.detach(), best)
                if step % max(self.steps // 10, 1) == 0:  # torchattacks' early stop, kept
                    if cost.item() > prev_cost:
                        return best
                    prev_cost = cost.item()
            return best

    return RepairedCW


def torchattacks_attack(name: str, **kw) -> Attack:
    def make(model, kappa):
        import torchattacks

        torch.manual_seed(0)  # PGD's random start draws from the global RNG
        return getattr(torchattacks, name)(model, **kw)
    return on_images(make)


def foolbox_attack(name: str, **kw) -> Attack:
    def attack(model, x, y, kappa):
        import foolbox

        fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
        _, clipped, _ = getattr(foolbox.attacks, name)(**kw)(fmodel, x, y, epsilons=None)
        return clipped
    return attack


@dataclass
class Method:
    label: str
    attack: Attack
    minimum_norm: bool = True
    per_kappa: bool = True     # False: computed once per model, judged at every kappa


def methods(second_order: bool, eps_l2: float, eps_linf: float) -> list[Method]:
    ours = [Method("curvkit TR L2 (order 1)", curvkit_tr("l2", 1)), Method("curvkit TR Linf (order 1)",
                                                                         curvkit_tr("linf", 1))]
    if second_order:
        ours += [Method("curvkit TR L2 (order 2)", curvkit_tr("l2", 2)),
                 Method("curvkit TR Linf (order 2)", curvkit_tr("linf", 2))]
    return ours + [
        Method("torchattacks CW c=1 (as shipped)", torchattacks_cw(1.0, False)),
        Method("torchattacks CW c=10 (as shipped)", torchattacks_cw(10.0, False)),
        Method("torchattacks CW c=1 (repaired)", torchattacks_cw(1.0, True)),
        Method("torchattacks CW c=10 (repaired)", torchattacks_cw(10.0, True)),
        Method("torchattacks DeepFool", torchattacks_attack("DeepFool", steps=50, overshoot=0.02), per_kappa=False),
        Method("foolbox DDN", foolbox_attack("DDNAttack", steps=100), per_kappa=False),
        Method("foolbox FMN-L2", foolbox_attack("L2FMNAttack", steps=100), per_kappa=False),
        Method("foolbox FMN-Linf", foolbox_attack("LInfFMNAttack", steps=100), per_kappa=False),
        Method(f"torchattacks PGD-L2 eps={eps_l2:.3f}", torchattacks_attack(
            "PGDL2", eps=eps_l2, alpha=eps_l2 / 4, steps=10), minimum_norm=False, per_kappa=False),
        Method(f"torchattacks PGD-Linf eps={eps_linf:.3f}", torchattacks_attack(
            "PGD", eps=eps_linf, alpha=eps_linf / 4, steps=10), minimum_norm=False, per_kappa=False),
        Method(f"torchattacks FGSM eps={eps_linf:.3f}", torchattacks_attack("FGSM", eps=eps_linf), minimum_norm=False,
               per_kappa=False),
    ]


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One attack's adversarial examples on the points, with its cost."""

    adversarial: torch.Tensor | None = None
    seconds: float = math.nan
    passes: float = math.nan
    products: float = 0.0
    error: str | None = None


def run(method: Method, model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: float) -> Run:
    """The attack's output and cost; CPU time is the median of 3 runs for attacks that take under a second."""
    counted = Counted(model).eval()
    seconds = []
    try:
        while not seconds or (len(seconds) < 3 and sum(seconds) < 1.0):
            start = time.process_time()
            out = method.attack(counted if not seconds else model, x, y, kappa)
            seconds.append(time.process_time() - start)
    except FAILURES as err:  # a broken anchor is reported, not fatal
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return Run(error=f"n/a ({type(err).__name__}: {text[:70]})")
    if hasattr(out, "passes"):  # curvkit counts its own: the wrapper sees one batched backward over k candidates once
        adversarial, passes, products = out.adversarial, float(out.passes.double().mean()), float(
            out.products.double().mean())
    else:
        adversarial, passes, products = out, counted.rows / len(x), 0.0
    return Run(adversarial.detach().clamp(0.0, 1.0), statistics.median(seconds), passes, products)


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True logit minus best wrong logit."""
    with torch.no_grad():
        logits = model(x)
    return logits.gather(1, y[:, None])[:, 0] - logits.scatter(1, y[:, None], -torch.inf).amax(1)


def broken(model, adversarial, x, y, kappa) -> torch.Tensor:
    """Success at kappa, counting only points that stayed inside [0, 1]."""
    m = margins(model, adversarial, y)
    return (m < 0) & (m <= -kappa) & (adversarial.min(1).values >= 0) & (adversarial.max(1).values <= 1)


def median(values: torch.Tensor) -> str:
    return f"{values.median().item():.3f}" if len(values) else "n/a"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def verdict(value: float, limit: float, at_most: bool = True, percent: bool = False) -> str:
    met = value <= limit if at_most else value >= limit
    shown = f"{100 * value:.1f}%" if percent else f"{value:.3g}"
    return f"{shown} **{'met' if met else 'NOT MET'}**"


def bench_model(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: list[str]) -> list[str]:
    first = trust_region(model, x, y, norm="l2")
    first_linf = trust_region(model, x, y, norm="linf")
    eps_l2 = float(first.norms[first.success].median())
    eps_linf = float(first_linf.norms[first_linf.success].median())
    listed = methods(name in SECOND_ORDER, eps_l2, eps_linf)
    once: dict[str, Run] = {}
    tables = []
    for kappa in KAPPAS:
        runs = {}
        for method in listed:
            if method.per_kappa:
                runs[method.label] = run(method, model, x, y, kappa)
                continue
            if method.label not in once:
                once[method.label] = run(method, model, x, y, kappa)
            runs[method.label] = once[method.label]
        tables.append(report(name, model, x, y, kappa, runs, listed, targets))
    return tables


def report(name, model, x, y, kappa, runs: dict[str, Run], listed: list[Method], targets: list[str]) -> str:
    ok = {label: broken(model, r.adversarial, x, y, kappa) for label, r in runs.items() if r.error is None}
    compared = {m.label for m in listed if m.minimum_norm and m.label in ok and ok[m.label].float().mean() >= 0.5}
    common = torch.ones(len(x), dtype=torch.bool)
    for label in compared:
        common &= ok[label]
    rows = []
    for method in listed:
        r = runs[method.label]
        if r.error:
            rows.append([method.label, r.error, "", "", "", "", ""])
            continue
        delta = (r.adversarial - x).flatten(1)
        l2, linf = delta.norm(dim=1), delta.abs().amax(1)
        hit = ok[method.label]
        rounded = torch.round(r.adversarial * GRID) / GRID
        survive = (margins(model, rounded, y) < 0)[hit].float().mean().item() if hit.any() else math.nan
        if method.label in compared:
            norms = [median(l2[common]), median(linf[common])]
        elif method.minimum_norm:
            norms = [f"({median(l2[hit])})", f"({median(linf[hit])})"]
        else:
            norms = ["budget", "budget"]
        cost = f"{r.passes:.0f}" + (f" + {r.products:.0f} HVP" if r.products else "")
        rows.append([method.label, f"{100 * hit.float().mean().item():.1f}%", *norms, f"{r.seconds:.2f}", cost,
                     "n/a" if math.isnan(survive) else f"{100 * survive:.0f}%"])
    text = table(f"{name}, kappa = {kappa:g}: {len(x)} correctly classified test points; norms: medians over the "
                 f"{int(common.sum())} points broken by every minimum-norm attack that broke at least half, (in "
                 "parentheses) over the attack's own broken points for the others",
                 ["attack", "success", "median L2", "median Linf", "CPU s", "passes / example",
                  "still adversarial after rounding"], rows)
    check_targets(name, model, x, kappa, runs, ok, targets)
    return text


def check_targets(name, model, x, kappa, runs: dict[str, Run], ok: dict[str, torch.Tensor], targets: list[str]):
    ours = [label for label in ok if label.startswith("curvkit")]
    if kappa == 0.5:
        for label in ours:
            targets.append(f"- {name}, {label}, kappa 0.5: success >= {SUCCESS_TARGET:.0%}: "
                           f"{verdict(ok[label].float().mean().item(), SUCCESS_TARGET, at_most=False, percent=True)}")
    elif any("order 2" in label for label in ours):
        for label in (label for label in ours if "order 2" in label):
            targets.append(f"- {name}, {label}, kappa 0: success >= {SUCCESS_TARGET:.0%}: "
                           f"{verdict(ok[label].float().mean().item(), SUCCESS_TARGET, at_most=False, percent=True)}")
    cw = "torchattacks CW c=10 (repaired)"
    tr = "curvkit TR L2 (order 1)"
    if kappa != 0.5 or cw not in ok or tr not in ok:
        return
    both = ok[cw] & ok[tr]
    l2 = {label: (runs[label].adversarial - x).flatten(1).norm(dim=1)[both] for label in (cw, tr)}
    ratio = (l2[tr].median() / l2[cw].median()).item() if both.any() else math.nan
    targets.append(f"- {name}, kappa 0.5: median L2 of curvkit TR / repaired CW c=10 on the {int(both.sum())} points "
                   f"both broke <= {NORM_TARGET}: {verdict(ratio, NORM_TARGET)}")
    targets.append(f"- {name}, kappa 0.5: CPU time of curvkit TR L2 / repaired CW c=10 <= {TIME_TARGET}: "
                   f"{verdict(runs[tr].seconds / runs[cw].seconds, TIME_TARGET)}")


def main() -> None:
    torch.set_num_threads(1)
    train_data, (X, Y) = load_digits_tensors(0, standardize=False)
    tables, targets = [], []
    for name, factory in MODELS.items():
        model = train(factory, train_data)
        with torch.no_grad():
            correct = model(X).argmax(1) == Y
        print(f"\n## {name}: test accuracy {correct.float().mean().item():.3f}", flush=True)
        tables += bench_model(name, model, X[correct][:POINTS], Y[correct][:POINTS], targets)
    print("\n\n## Summary")
    print("\n".join(tables))
    print("\n### Targets\n")
    print("\n".join(targets))


if __name__ == "__main__":
    main()
