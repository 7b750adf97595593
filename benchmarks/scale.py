"""Scale on one CPU: top eigenvalue, trace and a 60-node density of ~10M-parameter models, against a training step.

Two models in float32 on the CPU, BatchNorm in eval mode for the Hessian:

- ``conv``: ResNet-18 widths (64-128-256-512, two basic blocks per stage, ImageNet stem), 3x32x32 inputs,
  10 classes, batch 32 (11.2M parameters; batch 32 rather than 64 keeps the run near 10 minutes);
- ``lm``: a 6-layer pre-LayerNorm transformer LM (d_model 320, 5 heads, MLP 4x, vocabulary 8000, tied
  embedding, context 128), causal attention written out (twice differentiable), batch 2 x 128 tokens
  (10.0M parameters).

Each measurement runs in a fresh subprocess, so its peak resident memory is its own: one training step
(SGD with momentum, the model in train mode), ``eigenvalues(k=1, tol=1e-3)`` (also with a float32 basis),
``trace(rtol=0.05)`` (its 95% interval; at most 40 products, so a run stays within minutes; also with
``max_block=1``) and ``density(n_probes=1, n_iter=60)`` (60 nodes, 60 products, the cheapest way to 60 nodes:
one recurrence, no block products). The operators otherwise use the default ``max_block=None`` (chosen from
the available memory). Printed per statistic: CPU time, products, the rise of peak resident memory over the
process's resident memory before it (peak reset with ``/proc/self/clear_refs``), that rise in float64
parameter vectors (8n bytes), and over the training step's.

    python benchmarks/scale.py            # ~20 min on the shared 2-core machine
    python benchmarks/scale.py --quick    # ~3 min: narrow models, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Before torch loads libgomp: spinning OpenMP workers would bill CPU time while waiting for a descheduled peer
# on a shared machine (see engine_vs_anchors.py). The subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STATS = ("train step", "eigenvalues", "eigenvalues, float32 basis", "trace", "trace, max_block=1", "density")
TRACE_BUDGET = 40   # products at most for trace(rtol=0.05)
MEMORY_TARGET = 3.0


def conv_net(width: int):
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    widths = [width, 2 * width, 4 * width, 8 * width]
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, w in enumerate(widths):
        layers += [Basic(cin, w, 1 if i == 0 else 2), Basic(w, w, 1)]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def transformer_lm(vocab: int, d: int, layers: int, heads: int, context: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            att = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp(self.ln2(x))

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(context, d))
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln = nn.LayerNorm(d)

        def forward(self, tokens):
            x = self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]])
            return (self.ln(x) @ self.embed.weight.T).flatten(0, 1)   # (batch * context, vocab), tied head

    return LM()


def problem(name: str, quick: bool):
    """The model, one batch (inputs, targets) and the loss."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if name == "conv":
        model, batch = conv_net(8 if quick else 64), 16 if quick else 32
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    else:
        vocab, context, batch = (1000, 32, 2) if quick else (8000, 128, 2)
        model = transformer_lm(vocab, 64 if quick else 320, 2 if quick else 6, 4 if quick else 5, context)
        tokens = torch.randint(0, vocab, (batch, context + 1))
        x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    return model, (x, y), F.cross_entropy


def _memory_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0])


def measure(name: str, stat: str, quick: bool) -> dict:
    """One statistic on a fresh process: CPU seconds, products, peak RSS rise (MiB) and what it found."""
    import torch

    from curvkit.hessian import HessianOperator, density, eigenvalues, trace

    model, (x, y), loss_fn = problem(name, quick)
    one = len(y) // len(x)   # targets per input: one sample's worth initialises the kernels and thread pools
    loss_fn(model.eval()(x[:1]), y[:one]).backward()
    model.zero_grad(set_to_none=True)
    out = {"model": name, "stat": stat, "params": sum(p.numel() for p in model.parameters())}
    H = None
    if stat != "train step":
        model.eval()
        H = HessianOperator(model, loss_fn, (x, y), max_block=1 if stat.endswith("max_block=1") else None)
    Path("/proc/self/clear_refs").write_text("5")   # the peak resident memory restarts from here
    before = _memory_kib("VmRSS")
    start = time.process_time()
    if stat == "train step":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn(model.train()(x), y).backward()
        opt.step()
        out["result"] = "SGD(momentum=0.9) step"
    elif stat.startswith("eigenvalues"):
        basis = torch.float32 if stat.endswith("float32 basis") else torch.float64
        res = eigenvalues(H, k=1, tol=1e-3, seed=0, basis_dtype=basis)
        out["result"] = (f"{float(res.values[0]):.4g} (residual {float(res.residuals[0]):.1e}, "
                         f"converged {res.converged})")
    elif stat.startswith("trace"):
        res = trace(H, rtol=0.05, max_matvecs=TRACE_BUDGET, seed=0)
        out["result"] = (f"{res.estimate:.4g}, 95% CI ({res.ci95[0]:.4g}, {res.ci95[1]:.4g}), {res.method}, "
                         f"converged {res.converged}")
    else:
        spec = density(H, n_probes=1, n_iter=60, seed=0)
        out["result"] = f"{spec.nodes.numel()} nodes in [{float(spec.nodes.min()):.3g}, {float(spec.nodes.max()):.3g}]"
    out["cpu_s"] = time.process_time() - start
    out["rise_mib"] = (_memory_kib("VmHWM") - before) / 1024
    out["products"] = H.matvecs if H is not None else 0
    if stat.startswith("trace"):
        out["result"] += f"; max_block {H.max_block}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow models: a smoke test in about a minute")
    parser.add_argument("--models", default="conv,lm", help="subset of conv,lm")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "STAT"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.quick)))
        return
    import warnings

    warnings.simplefilter("ignore")
    for name in args.models.split(","):
        rows, train = [], None
        for stat in STATS:
            cmd = [sys.executable, __file__, "--one", name, stat] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} {stat} failed:\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            train = r["rise_mib"] if stat == "train step" else train
            ratio = r["rise_mib"] / train if train else float("nan")
            verdict = "" if stat == "train step" else (" (met)" if ratio <= MEMORY_TARGET else " (not met)")
            vectors = r["rise_mib"] * 2**20 / (8 * r["params"])
            rows.append(f"| {stat} | {r['cpu_s']:.1f} | {r['products']} | {r['rise_mib']:.0f} | {vectors:.1f} | "
                        f"{ratio:.2f}{verdict} | {r['result']} |")
            print(f"  {name} {stat}: done ({r['cpu_s']:.0f} s CPU)", file=sys.stderr, flush=True)
        print(f"\n### {name}: {r['params'] / 1e6:.1f}M parameters\n")
        print(f"| statistic | CPU s | products | peak RSS rise (MiB) | in float64 vectors | / training step "
              f"(target <= {MEMORY_TARGET:g}) | result |")
        print("|---|---:|---:|---:|---:|---:|---|")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
