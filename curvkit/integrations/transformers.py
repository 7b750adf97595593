"""Hugging Face ``Trainer``: train with AdaHessian or Sophia through ``CurvatureTrainer``, and log sharpness.

The change: ``CurvatureTrainer`` instead of ``Trainer``, and the optimizer (with a scheduler) passed as
``optimizers=(opt, scheduler)``:

.. code-block:: python

    from transformers import TrainingArguments, get_linear_schedule_with_warmup
    from curvkit.integrations.transformers import CurvatureTrainer, SharpnessCallback
    from curvkit.optim import AdaHessian

    opt = AdaHessian(model.parameters(), lr=0.05, update_each=2, seed=0)
    scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=500)
    trainer = CurvatureTrainer(                           # was: Trainer(
        model=model, args=TrainingArguments("out", max_steps=500), train_dataset=dataset,
        optimizers=(opt, scheduler),                      # Trainer builds AdamW when this is left out
        callbacks=[SharpnessCallback(None, batch, forward=lambda model, batch: model(**batch).loss)],
    )
    trainer.train()

``Trainer`` calls ``accelerator.backward(loss)`` and then ``optimizer.step()``. ``CurvatureTrainer`` makes
that backward ``create_graph=True`` exactly when the optimizer's next step refreshes its curvature
(``optimizer.next_step_needs_graph()``; the ``update_each`` steps in between cost a plain backward), and runs
those training steps with PyTorch's twice-differentiable attention kernel (the fused ones have no double
backward). With ``gradient_accumulation_steps`` every micro-batch of a refreshing step keeps its graph, so
the curvature is that of the accumulated loss. ``max_grad_norm`` (1.0 by default) clips the gradient the
step uses; the curvature is that of the unclipped loss. fp16 with a gradient scaler is refused (the scaled
loss would scale the curvature). Optimizers without ``next_step_needs_graph`` train exactly as in ``Trainer``.
SophiaG (``estimator="gnb"``) needs the logits, which ``Trainer`` does not hand to the optimizer: use SophiaH.
Train in one process: a DDP-wrapped model cannot double-backward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch

from .._utils.borrow import twice_differentiable
from ._graph import needs_graph
from ._imports import require
from ._sharpness import SharpnessProbe

transformers = require("transformers", "transformers")


@contextmanager
def _backward_keeps_graph(accelerator: Any) -> Iterator[None]:
    """``accelerator.backward(loss, **kw)`` with ``create_graph=True`` inside the block, restored after it."""
    own = vars(accelerator).get("backward")
    accelerator.backward = functools.partial(accelerator.backward, create_graph=True)
    try:
        yield
    finally:
        if own is None:
            del accelerator.backward  # the class's method again
        else:
            accelerator.backward = own


class CurvatureTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose backward keeps the graph when a curvature optimizer's next step needs it.

    Use it as ``Trainer``, passing the curvature optimizer as ``optimizers=(opt, scheduler)``; see the module
    docstring. ``SharpnessCallback`` logs through this trainer's ``log``.

    Raises:
        RuntimeError: (on a training step) fp16 with a gradient scaler on a step that keeps the graph.
    """

    def training_step(self, model: torch.nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step``, with ``create_graph=True`` when the optimizer's next step needs the graph.

        Args:
            model: the model being trained.
            inputs: the batch.
            *args: passed on to ``Trainer.training_step`` (``num_items_in_batch``).
            **kwargs: passed on.

        Returns:
            The detached loss of the step, as ``Trainer.training_step``.

        Raises:
            RuntimeError: the graph is needed but the loss is scaled by an fp16 gradient scaler.
        """
        if not needs_graph([self.optimizer]):
            return super().training_step(model, inputs, *args, **kwargs)
        if getattr(self.accelerator, "scaler", None) is not None:
            raise RuntimeError("fp16 mixed precision scales the loss by the gradient scaler's factor, which would "
                               "scale the curvature the optimizer estimates by it too: use bf16=True or full precision")
        with twice_differentiable(), _backward_keeps_graph(self.accelerator):
            return super().training_step(model, inputs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, with this trainer's ``log`` given to every ``SharpnessCallback`` first.

        Args:
            *args: passed on to ``Trainer.train``.
            **kwargs: passed on.

        Returns:
            What ``Trainer.train`` returns.
        """
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, SharpnessCallback):
                callback._log = self.log
        return super().train(*args, **kwargs)


class SharpnessCallback(transformers.TrainerCallback):
    """Log the sharpness of the model being trained through ``CurvatureTrainer.log``.

    After the optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ... and after the last one (``max_steps``,
    or an earlier stop requested by then, so the last value logged is the final model's), the top Hessian
    eigenvalue of the loss on the fixed ``data`` is logged as ``sharpness``, reaching ``state.log_history``
    and every reporting integration (``report_to``) at ``step=state.global_step``; with ``preconditioned=True``
    also ``preconditioned_sharpness`` (top eigenvalue of P^-1 H for the optimizer's preconditioner P) and
    ``stability_threshold``. A :class:`~curvkit.analysis.SharpnessTracker` does the measuring. The model is
    never changed: the measurement sees it in eval mode (dropout off) and every module's mode is restored.

    .. code-block:: python

        callback = SharpnessCallback(None, batch, every_n_steps=20, forward=lambda model, b: model(**b).loss)
        trainer = CurvatureTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                                   callbacks=[callback])

    Args:
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, or None with ``forward=`` among ``tracker_kwargs``
            (``forward=lambda model, batch: model(**batch).loss`` for a model that computes its loss).
        data: the fixed batch (or batches) the curvature is measured on.
        every_n_steps: measure after every that many optimizer steps (and after the last).
        preconditioned: also log the preconditioned sharpness and the stability threshold.
        **tracker_kwargs: passed to :class:`~curvkit.analysis.SharpnessTracker` (``forward``, ``tol``, ``seed``,
            ``operator``, ``params``, ...).

    Raises:
        ValueError: ``every_n_steps`` is not a positive integer, or ``preconditioned`` is not a bool.
        RuntimeError: (on train begin) the trainer is not a ``CurvatureTrainer``, through which it logs.
    """

    def __init__(self, loss_fn: Any, data: Any, every_n_steps: int = 10, preconditioned: bool = False,
                 **tracker_kwargs: Any):
        self._probe = SharpnessProbe(loss_fn, data, every_n_steps, preconditioned, tracker_kwargs)
        self._log = None

    @property
    def history(self) -> pd.DataFrame:
        """Every measurement: step (optimizer steps), loss, sharpness, preconditioned sharpness, threshold, ..."""
        return self._probe.history

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check that a ``CurvatureTrainer`` runs, so that the values reach its log and reporting integrations."""
        if self._log is None:
            raise RuntimeError("SharpnessCallback logs through curvkit.integrations.transformers.CurvatureTrainer: "
                               "use it in place of transformers.Trainer (any optimizer trains in it as in Trainer)")

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Measure and log after every ``every_n_steps`` optimizer steps and after the last one."""
        step = state.global_step
        last = control.should_training_stop or step >= state.max_steps
        if self._probe.due(step) or (last and self._probe.missed(step)):
            self._log(self._probe.measure(model, optimizer, step))
