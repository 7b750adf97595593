"""The result record of an attack: a small dataclass of per-example tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(repr=False)
class AttackResult:
    """Adversarial examples and, per example, whether and how cheaply they were found.

    ``adversarial`` is shaped like the attacked inputs and lies inside the bounds; per example (N,):
    ``success`` (the best wrong logit beats the true one by at least the confidence, strictly, at
    ``adversarial``), ``norms`` (of ``adversarial - x`` in the attack's ``norm``), ``margins`` (true logit
    minus best wrong logit at ``adversarial``), ``iterations`` (trust-region steps), ``passes`` (forward
    plus backward passes through the model) and ``products`` (input-space Hessian-vector products,
    each about two backward passes; zero for first order).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    norms: torch.Tensor
    margins: torch.Tensor
    iterations: torch.Tensor
    passes: torch.Tensor
    products: torch.Tensor
    norm: str

    def __repr__(self) -> str:
        broken = self.norms[self.success]
        median = f"{broken.median().item():.4g}" if len(broken) else "n/a"
        return (f"AttackResult(success={int(self.success.sum())}/{len(self.success)}, "
                f"median {self.norm} norm of successes={median}, "
                f"mean iterations={self.iterations.double().mean().item():.3g}, "
                f"mean passes={self.passes.double().mean().item():.3g}, "
                f"mean products={self.products.double().mean().item():.3g})")
