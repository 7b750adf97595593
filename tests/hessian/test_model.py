"""ModelOperator's block size: an explicit max_block, or one chosen from the available memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvkit.hessian.model as model_module
from curvkit.hessian import HessianOperator
from curvkit.hessian.model import MAX_BLOCK_CAP, MEMORY_SHARE, available_memory, block_rows
from tests._models import dense_hessian, make_model


def _saved_bytes(H: HessianOperator) -> int:
    """What autograd saves for one forward of H's model on its batch, counted independently of curvkit."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    x, y = H._batches[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(H.model(x), y)
    return saved


def test_block_rows_fits_the_share_and_clamps():
    assert block_rows(int(10 / MEMORY_SHARE), 3) == 3          # floor(10 / 3)
    assert block_rows(int(10 / MEMORY_SHARE), 11) == 1         # one row even when it does not fit
    assert block_rows(2**50, 1) == MAX_BLOCK_CAP
    assert block_rows(None, 1) == MAX_BLOCK_CAP                # unknown memory: the cap


def test_available_memory_on_this_machine():
    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert available_memory(torch.device("meta")) is None


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_max_block_none_follows_the_documented_rule(monkeypatch, rows):
    model, x, y = make_model("tanh_mlp")
    H = HessianOperator(model, F.cross_entropy, (x, y))
    row_bytes = _saved_bytes(H) + 3 * 8 * H.shape[0]
    available = int((rows + 0.5) * row_bytes / MEMORY_SHARE)
    monkeypatch.setattr(model_module, "available_memory", lambda device: available)
    assert H.max_block == rows
    monkeypatch.setattr(model_module, "available_memory", lambda device: 2**60)
    assert H.max_block == rows                                  # chosen once, at first use


def test_chosen_and_explicit_blocks_give_exact_products(monkeypatch):
    model, x, y = make_model("tanh_mlp")
    D = dense_hessian(model, F.cross_entropy, [(x, y)])
    V = torch.randn(D.shape[0], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model_module, "available_memory", lambda device: 1)   # no room: one row at a time
    for H, block in [(HessianOperator(model, F.cross_entropy, (x, y)), 1),
                     (HessianOperator(model, F.cross_entropy, (x, y), max_block=3), 3),
                     (HessianOperator(model, F.cross_entropy, [(x[:10], y[:10]), (x[10:], y[10:])], max_block=2), 2)]:
        torch.testing.assert_close(H @ V, D @ V, rtol=1e-10, atol=1e-12)
        assert H.max_block == block


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4"])
def test_bad_max_block_is_refused(bad):
    model, x, y = make_model("tanh_mlp")
    with pytest.raises(ValueError, match="max_block must be a positive integer or None"):
        HessianOperator(model, F.cross_entropy, (x, y), max_block=bad)
