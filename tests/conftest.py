"""Fixtures and session settings; the helpers themselves live in tests/_models.py."""

from __future__ import annotations

import pytest
import torch

from tests._models import MODEL_KINDS, hessian_case

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared 2-core machine


@pytest.fixture(params=MODEL_KINDS, name="model_and_hessian")
def model_and_hessian_fixture(request):
    """(model, batch, dense Hessian), shared across tests: curvkit must never mutate the model."""
    return hessian_case(request.param)
