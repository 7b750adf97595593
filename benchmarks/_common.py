"""What several benchmark scripts share: the digits models, Adam pre-training, and the markdown report."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def digits_cnn() -> nn.Module:
    """conv8-conv16-avgpool-linear on 8x8 digits given as 64 features."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def adam_pretrain(model: nn.Module, data, epochs: int, seed: int = 0) -> nn.Module:
    """``epochs`` of Adam (lr 3e-3, batch 64) with a seeded order, so a model is not at its random initialisation."""
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def backward_step(model: nn.Module, opt: torch.optim.Optimizer):
    """A training step ``step(x, y) -> loss`` of ``opt`` with a plain cross-entropy backward."""
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


class Report:
    """Markdown tables printed as they come and again, with the targets, at the end."""

    def __init__(self):
        self.tables: list[str] = []
        self.targets: list[str] = []

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        self.tables.append("\n".join(lines))
        print(self.tables[-1], flush=True)

    def target(self, text: str, met: bool, figure: str) -> None:
        self.targets.append(f"- {text}: {figure} **{'met' if met else 'NOT MET'}**")

    def note(self, line: str) -> None:
        self.targets.append(line)

    def print_all(self) -> None:
        print("\n\n## Summary")
        print("\n".join(self.tables))
        print("\n### Targets\n")
        print("\n".join(self.targets))
