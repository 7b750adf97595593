"""Doctests: every ``>>>`` example in curvkit runs with ``torch``, ``nn`` and ``F`` imported and a fixed seed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _pytest.doctest import DoctestItem
from torch import nn

# the integrations import their framework (optional extras, installed by the test extra for CI)
collect_ignore = [f"curvkit/integrations/{name}.py" for name in ("lightning", "transformers")
                  if importlib.util.find_spec(name) is None]


@pytest.fixture(autouse=True)
def _doctest_namespace(request, doctest_namespace):
    if isinstance(request.node, DoctestItem):
        doctest_namespace.update(torch=torch, nn=nn, F=F)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)   # as in a user's session (the test suite runs in float64)
        yield
        torch.set_default_dtype(default)
    else:
        yield
