"""Sensitivity tables: the model is borrowed, and forward= reaches every model call (dict batches)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch.nn.functional as F

from curvkit.compress import mixed_precision, sensitivity
from tests._models import assert_same_state, dict_twins, loss_of_dict_batch, mixed_modes_case, model_state


def test_nested_modules_keep_their_modes_parameters_buffers_and_grads():
    model, data = mixed_modes_case()
    before = model_state(model)
    with pytest.warns(RuntimeWarning, match="rtol"):
        layer = sensitivity(model, F.cross_entropy, data, "layer", max_matvecs=40, progress=False)
    with pytest.warns(RuntimeWarning, match="rtol"):
        sensitivity(model, F.cross_entropy, data, "channel", max_matvecs=40, progress=False)
    mixed_precision(model, layer, max_weight_bits=4 * layer["n_params"].sum())
    assert_same_state(before, model_state(model))
    assert model.training and not model.body[3].training and model.head[2].training


def _numbers(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns="module").reset_index(drop=True)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_forward_hook_reaches_the_mac_count_and_the_traces(granularity):
    net, pairs, wrapped, dicts = dict_twins()
    kwargs = dict(granularity=granularity, seed=0, max_matvecs=60, progress=False)
    with pytest.warns(RuntimeWarning, match="rtol"):
        want = sensitivity(net, F.cross_entropy, pairs, **kwargs)
    with pytest.warns(RuntimeWarning, match="rtol"):
        got = sensitivity(wrapped, None, dicts, forward=loss_of_dict_batch, **kwargs)
    assert list(got["module"]) == ["net." + m for m in want["module"]]
    pd.testing.assert_frame_equal(_numbers(got), _numbers(want), check_exact=False, rtol=1e-10)
    if granularity == "layer":
        np.testing.assert_array_equal(got["macs"], [5 * 6, 6 * 4, 4 * 3])
