"""Small datasets that ship offline, for examples, notebooks and tests."""

from __future__ import annotations

import torch


def load_digits_tensors(seed: int = 0, standardize: bool = True):
    """The 8x8 digits of scikit-learn (they ship offline), split 80/20 with a fixed seed.

    Pixels are scaled to [0, 1] (the data's grid is 1/16) and then, with ``standardize=True``, standardised.

    Args:
        seed: the seed of the split.
        standardize: standardise every pixel with the whole set's mean and standard deviation.

    Returns:
        ``((X_train, y_train), (X_test, y_test))``: float32 inputs of 64 pixels and int64 labels.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the demo needs scikit-learn: pip install 'curvkit[demo]'") from err
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    if standardize:
        X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    cut = int(0.8 * len(y))
    return (X[:cut], y[:cut]), (X[cut:], y[cut:])
