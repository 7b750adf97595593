"""curvkit in the training frameworks people use: PyTorch Lightning and the Hugging Face Trainer.

Each submodule imports its framework when it is imported itself (``pip install 'curvkit[lightning]'`` or
``'curvkit[transformers]'``); importing :mod:`curvkit` never does.

- :mod:`curvkit.integrations.lightning`: ``CurvatureModule``, a ``LightningModule`` whose backward keeps
  the graph on the steps where a curvature optimizer (AdaHessian, Sophia) refreshes its estimate, and
  ``SharpnessCallback``, which logs the sharpness of the model being trained;
- :mod:`curvkit.integrations.transformers`: ``CurvatureTrainer``, a ``transformers.Trainer`` doing the same,
  and its ``SharpnessCallback``.

An optimizer tells the frameworks when its next step differentiates the gradients with a method
``next_step_needs_graph()`` (curvkit's curvature optimizers have it); every other optimizer trains as before.
"""
