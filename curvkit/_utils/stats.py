"""Running means and standard errors of the mean from sums and sums of squares."""

from __future__ import annotations

import torch


class RunningMoments:
    r"""Mean and standard error of the mean of samples added in blocks, per entry of a fixed shape.

    With m samples x_1..x_m, mean = sum x / m and the standard error is sqrt(s^2 / m), with the
    unbiased variance s^2 = (sum x^2 - m mean^2) / (m - 1) (infinite for m < 2).

    >>> acc = RunningMoments(2)
    >>> acc.add(torch.tensor([[1.0, 3.0], [2.0, 5.0]], dtype=torch.float64))
    >>> acc.mean.tolist(), acc.count
    ([2.0, 3.5], 2)
    """

    def __init__(self, *shape: int, device: torch.device | str | None = None):
        self.total = torch.zeros(*shape, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros_like(self.total)
        self.count = 0

    def add(self, samples: torch.Tensor) -> None:
        """Add the samples in the last dimension of ``samples`` (shape ``(*shape, k)``)."""
        self.total += samples.sum(-1)
        self.total_sq += samples.square().sum(-1)
        self.count += samples.shape[-1]

    @property
    def mean(self) -> torch.Tensor:
        """The mean of the samples so far."""
        return self.total / max(self.count, 1)

    @property
    def stderr(self) -> torch.Tensor:
        """The standard error of the mean (inf before two samples)."""
        if self.count < 2:
            return torch.full_like(self.total, float("inf"))
        m = self.count
        return ((self.total_sq - m * self.mean.square()).clamp_min(0) / (m - 1) / m).sqrt()
