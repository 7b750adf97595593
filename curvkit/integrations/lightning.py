"""PyTorch Lightning: train with AdaHessian or Sophia by deriving from ``CurvatureModule``, and log sharpness.

The one-line change: ``class Net(CurvatureModule)`` instead of ``class Net(LightningModule)``; return
the curvature optimizer from ``configure_optimizers`` as any other (with a scheduler if you like).

.. code-block:: python

    from curvkit.integrations.lightning import CurvatureModule, SharpnessCallback
    from curvkit.optim import AdaHessian

    class Net(CurvatureModule):                      # was: class Net(lightning.pytorch.LightningModule)
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return AdaHessian(self.parameters(), lr=0.15, update_each=2, seed=0)

    trainer = lightning.pytorch.Trainer(max_epochs=3, callbacks=[SharpnessCallback(F.cross_entropy, (x, y))])
    trainer.fit(Net(), loader)

What happens: Lightning's automatic optimization calls ``optimizer.step(closure)`` with a closure that runs
``training_step`` and ``backward``. ``CurvatureModule.backward`` passes ``create_graph=True`` exactly when the
optimizer's next step refreshes its curvature (``optimizer.next_step_needs_graph()``, so ``update_each``
steps in between cost a plain backward), and the optimizer reads the gradient and its graph from ``.grad``.
Manual optimization works too (``self.manual_backward(loss)`` keeps the graph the same way, then
``opt.step()``). With Lightning's features:

- ``accumulate_grad_batches``: every micro-batch of a refreshing step keeps its graph, so the curvature
  is that of the accumulated (mean) loss, as for the gradient;
- ``gradient_clip_val``: clips the gradient the step uses; the curvature is that of the unclipped loss;
- LR schedulers, checkpoints (``ckpt_path=`` resumes the probe stream bit for bit) work as for any optimizer;
- ``precision="bf16-mixed"``: works (on CPU, Lightning also maps ``"16-mixed"`` to it); fp16 with a
  gradient scaler (``"16-mixed"`` on GPU) is refused, since the scaled loss would scale the curvature;
- SophiaG (``estimator="gnb"``) needs the logits, which automatic optimization does not hand to the
  optimizer: use manual optimization with ``opt.step(lambda: (loss_fn(logits := self(x), y), logits))``.

``training_step`` of a ``CurvatureModule`` subclass runs with PyTorch's twice-differentiable attention
kernel on steps that keep the graph (the fused kernels have no double backward). Train in one process:
a DDP-wrapped model cannot double-backward (curvkit's optimizers average over ranks themselves; see
:mod:`curvkit.optim`).
"""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd
import torch

from ._graph import curvature_forward, needs_graph
from ._imports import require
from ._sharpness import SharpnessProbe

pl = require("lightning.pytorch", "lightning")


def _optimizers(module: Any) -> list:
    """The optimizers of the trainer ``module`` is attached to (none when it is not attached)."""
    trainer = module._trainer
    return list(trainer.optimizers) if trainer is not None else []


def _with_curvature_forward(training_step):
    @functools.wraps(training_step)
    def wrapper(self, *args, **kwargs):
        with curvature_forward(_optimizers(self)):
            return training_step(self, *args, **kwargs)

    return wrapper


class CurvatureModule(pl.LightningModule):
    """A ``LightningModule`` whose backward keeps the graph when a curvature optimizer's next step needs it.

    Derive from it instead of ``LightningModule``; nothing else changes. See the module docstring for
    accumulation, clipping, schedulers, precision and checkpoints.

    Raises:
        RuntimeError: (on backward) fp16 mixed precision with a gradient scaler on a step that keeps the graph.
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "training_step" in cls.__dict__:  # the forward of a curvature step must be twice differentiable
            cls.training_step = _with_curvature_forward(cls.__dict__["training_step"])

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``loss.backward`` through Lightning, with ``create_graph=True`` when an optimizer's next step needs it.

        Args:
            loss: the (accumulation-normalised) loss of the training step.
            *args: passed on to ``LightningModule.backward``.
            **kwargs: passed on; an explicit ``create_graph`` is respected.

        Raises:
            RuntimeError: the graph is needed but the loss was scaled by an fp16 gradient scaler.
        """
        if "create_graph" not in kwargs and needs_graph(_optimizers(self)):
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise RuntimeError(
                    "fp16 mixed precision scales the loss by the gradient scaler's factor, which would scale the "
                    "curvature the optimizer estimates by it too: use precision='bf16-mixed' or '32-true'"
                )
            kwargs["create_graph"] = True
        super().backward(loss, *args, **kwargs)


class SharpnessCallback(pl.Callback):
    """Log the sharpness of the model being trained through the trainer's loggers.

    After the optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ... and after the last one (so the
    last value logged is the final model's), the top Hessian eigenvalue of the loss on the fixed ``data``
    is logged as ``sharpness`` at ``step=trainer.global_step``; with ``preconditioned=True`` also
    ``preconditioned_sharpness`` (the top eigenvalue of P^-1 H for the optimizer's preconditioner P) and
    ``stability_threshold``, the value at which the optimizer's step stops being stable. A
    :class:`~curvkit.analysis.SharpnessTracker` does the measuring, warm-started from the last measurement.
    The model is never changed: the measurement sees it in eval mode (dropout off) and every module's
    mode is restored.

    .. code-block:: python

        trainer = lightning.pytorch.Trainer(max_epochs=3, logger=CSVLogger("logs"),
                                            callbacks=[SharpnessCallback(F.cross_entropy, (x, y), every_n_steps=20)])

    Args:
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, with ``model`` the LightningModule (or None
            with ``forward=lambda model, batch: loss`` among ``tracker_kwargs``).
        data: the fixed batch (or batches) the curvature is measured on.
        every_n_steps: measure after every that many optimizer steps (and after the last).
        preconditioned: also log the preconditioned sharpness and the stability threshold of the (first)
            optimizer.
        **tracker_kwargs: passed to :class:`~curvkit.analysis.SharpnessTracker` (``tol``, ``seed``,
            ``operator``, ``params``, ``forward``, ...).

    Raises:
        ValueError: ``every_n_steps`` is not a positive integer, or ``preconditioned`` is not a bool.
    """

    def __init__(self, loss_fn: Any, data: Any, every_n_steps: int = 10, preconditioned: bool = False,
                 **tracker_kwargs: Any):
        super().__init__()
        self._probe = SharpnessProbe(loss_fn, data, every_n_steps, preconditioned, tracker_kwargs)

    @property
    def history(self) -> pd.DataFrame:
        """Every measurement: step (optimizer steps), loss, sharpness, preconditioned sharpness, threshold, ..."""
        return self._probe.history

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure and log when the optimizer step just taken is one of every ``every_n_steps``."""
        if self._probe.due(trainer.global_step):
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Measure and log the final model unless its step was just measured."""
        if self._probe.missed(trainer.global_step):
            self._log(trainer, pl_module)

    def _log(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self._probe.measure(pl_module, optimizer, trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
