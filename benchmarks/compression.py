"""Compression on a digits CNN: HAWQ mixed precision vs uniform quantization, Hessian vs magnitude pruning.

Prints two tables and saves two plots (accuracy vs average bits; accuracy vs pruned fraction).
Sensitivities come from the training data; accuracy is measured on the held-out split.

    python benchmarks/compression.py [--out benchmarks/figures] [--seeds 3]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from curvkit.compress import channel_scores, mixed_precision, prune_channels, quantize, recalibrate_bn, sensitivity
from curvkit.datasets import load_digits_tensors

BITS = (2, 3, 4, 5, 6, 8)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
METHODS = ("hessian", "quadratic", "l2", "l1")


def train_cnn(train, seed: int, epochs: int = 12) -> nn.Module:
    X, y = train
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100 + epoch)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def quantization_rows(model, sens, test, seed):
    rows = []
    for b in BITS:
        uniform = {m: b for m in sens["module"]}
        rows.append({"seed": seed, "scheme": "uniform", "avg_bits": float(b),
                     "accuracy": accuracy(quantize(model, uniform), test)})
    res = mixed_precision(model, sens, BITS, frontier=11)
    for _, point in res.frontier.iterrows():
        rows.append({"seed": seed, "scheme": "HAWQ (ILP)", "avg_bits": point["avg_bits"],
                     "accuracy": accuracy(quantize(model, point["bits"]), test)})
    return rows


def pruning_rows(model, train_batch, test, seed):
    rows = []
    for method in METHODS:
        scores = channel_scores(model, F.cross_entropy, train_batch, method, seed=seed, max_matvecs=1000,
                                progress=False)
        for fraction in FRACTIONS:
            pruned = prune_channels(model, F.cross_entropy, train_batch, amount=fraction, method=method, scores=scores)
            rows.append({"seed": seed, "method": method, "fraction": fraction, "accuracy": accuracy(pruned, test),
                         "accuracy_bn_recalibrated": accuracy(recalibrate_bn(pruned, [train_batch]), test)})
    return rows


def plot(df: pd.DataFrame, x: str, group: str, y: str, title: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in df.groupby(group):
        stats = g.groupby(x)[y].agg(["mean", "std"]).reset_index()
        ax.errorbar(stats[x], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=name)
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/figures")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_tensors()
    train_batch = (train[0][:512], train[1][:512])
    q_rows, p_rows, base = [], [], []
    for seed in range(args.seeds):
        model = train_cnn(train, seed)
        base.append(accuracy(model, test))
        sens = sensitivity(model, F.cross_entropy, train_batch, "layer", seed=seed, progress=False)
        q_rows += quantization_rows(model, sens, test, seed)
        p_rows += pruning_rows(model, train_batch, test, seed)
    print(f"digits CNN, {args.seeds} seeds: float accuracy {np.mean(base):.3f} +- {np.std(base):.3f}\n")
    q = pd.DataFrame(q_rows)
    q["avg_bits"] = q["avg_bits"].round(1)
    print("Quantization (accuracy, mean over seeds; HAWQ points are the ILP optimum per weight-size budget)")
    print(q.groupby(["scheme", "avg_bits"])["accuracy"].agg(["mean", "std"]).round(3).to_string(), "\n")
    p = pd.DataFrame(p_rows)
    print("Channel pruning, one shot, no fine-tuning (accuracy, mean over seeds)")
    print(p.pivot_table(index="fraction", columns="method", values="accuracy").round(3).to_string(), "\n")
    print("... with BatchNorm statistics re-estimated on 512 training samples")
    print(p.pivot_table(index="fraction", columns="method", values="accuracy_bn_recalibrated").round(3).to_string())
    plot(q, "avg_bits", "scheme", "accuracy", "Digits CNN: mixed vs uniform precision", "average bits per weight",
         out / "quantization_frontier.png")
    plot(p, "fraction", "method", "accuracy_bn_recalibrated", "Digits CNN: one-shot channel pruning",
         "fraction of channels pruned", out / "pruning.png")
    print(f"\nwrote {out / 'quantization_frontier.png'} and {out / 'pruning.png'}")


if __name__ == "__main__":
    main()
