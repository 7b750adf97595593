"""Small datasets that ship offline, for examples, notebooks and tests."""

from __future__ import annotations

import torch


def load_digits_tensors(seed: int = 0):
    """Sklearn's 8x8 digits (ships offline), standardised, split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the demo needs scikit-learn: pip install 'curvkit[demo]'") from err
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    cut = int(0.8 * len(y))
    return (X[:cut], y[:cut]), (X[cut:], y[cut:])
