"""Per-layer and per-channel statistics against exact dense blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from curvkit.hessian import GGNOperator, layerwise
from curvkit.hessian.lanczos import SegmentedLanczos
from tests._models import dense_ggn, hessian_case, spectrum_matrix


def _blocks(model, D, groups):
    """Dense diagonal blocks for groups given as lists of (param name, slice of its flat entries)."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = start
        start += p.numel()
    out = []
    for spans in groups:
        idx = torch.cat([torch.arange(offsets[n] + s.start, offsets[n] + s.stop) for n, s in spans])
        out.append(D[idx][:, idx])
    return out


def _module_groups(model):
    groups = []
    for mod_name, module in model.named_modules():
        spans = [(f"{mod_name}.{n}" if mod_name else n, slice(0, p.numel()))
                 for n, p in module.named_parameters(recurse=False)]
        if spans:
            groups.append(spans)
    return groups


@pytest.mark.parametrize("kind", ["conv_bn", "gelu_mlp"])
def test_module_traces_and_top_eigenvalues_match_dense_blocks(kind):
    model, data, D = hessian_case(kind)
    blocks = _blocks(model, D, _module_groups(model))
    df = layerwise(model, F.cross_entropy, data, rtol=0.02, max_matvecs=4000, eig_tol=1e-8, eig_steps=200,
                   seed=0, progress=False)
    assert list(df.columns) == ["module", "n_params", "trace", "trace_stderr", "top_eig"]
    assert list(df["n_params"]) == [b.shape[0] for b in blocks]
    exact_trace = np.array([float(b.trace()) for b in blocks])
    z = (df["trace"].to_numpy() - exact_trace) / df["trace_stderr"].to_numpy()
    assert np.all(np.abs(z) < 4.5), z
    exact_top = np.array([float(torch.linalg.eigvalsh(b)[-1]) for b in blocks])
    np.testing.assert_allclose(df["top_eig"].to_numpy(), exact_top, rtol=1e-6, atol=1e-9)


def test_parameter_and_regex_grouping():
    model, data, D = hessian_case("gelu_mlp")
    by_param = layerwise(model, F.cross_entropy, data, stats=("top_eig",), by="parameter", eig_tol=1e-8,
                         eig_steps=200, seed=0, progress=False)
    names = [n for n, _ in model.named_parameters()]
    assert list(by_param["parameter"]) == names
    blocks = _blocks(model, D, [[(n, slice(0, p.numel()))] for n, p in model.named_parameters()])
    np.testing.assert_allclose(by_param["top_eig"], [float(torch.linalg.eigvalsh(b)[-1]) for b in blocks],
                               rtol=1e-6, atol=1e-9)
    by_kind = layerwise(model, F.cross_entropy, data, stats=("trace", "mean_eig"), by=r"weight|bias",
                        max_matvecs=50, seed=0, progress=False)
    assert set(by_kind["group"]) == {"weight", "bias"}
    np.testing.assert_allclose(by_kind["mean_eig"], by_kind["trace"] / by_kind["n_params"])


def test_channel_traces_rank_like_exact_ones():
    model, data, D = hessian_case("conv_bn")
    df = layerwise(model, F.cross_entropy, data, by="channel", max_matvecs=2000, rtol=0.01, seed=0, progress=False)
    assert list(df.columns) == ["module", "channel", "n_params", "trace", "trace_stderr"]
    groups = []
    for mod_name, module in [("0", model[0]), ("4", model[4])]:
        per = module.weight[0].numel()
        for c in range(module.weight.shape[0]):
            groups.append([(f"{mod_name}.weight", slice(c * per, (c + 1) * per)),
                           (f"{mod_name}.bias", slice(c, c + 1))])
    exact = np.array([float(b.trace()) for b in _blocks(model, D, groups)])
    assert len(df) == len(exact) == 3 + 3
    assert spearmanr(df["trace"], exact).statistic >= 0.9
    z = (df["trace"].to_numpy() - exact) / df["trace_stderr"].to_numpy()
    assert np.all(np.abs(z) < 4.5), z


def test_segmented_lanczos_equals_separate_runs():
    A = spectrum_matrix(torch.linspace(-1, 3, 40), seed=0)
    ids = torch.tensor([0] * 15 + [1] * 25)
    block_diag = torch.block_diag(A[:15, :15], A[15:, 15:])
    lanczos = SegmentedLanczos(block_diag, torch.randn(40, generator=torch.Generator().manual_seed(0)), ids, 40)
    while not lanczos.done:
        lanczos.step()
    for g, (lo, hi) in enumerate([(0, 15), (15, 40)]):
        theta, _, _ = lanczos.ritz(g)
        torch.testing.assert_close(torch.as_tensor(theta), torch.linalg.eigvalsh(A[lo:hi, lo:hi]), rtol=1e-9, atol=1e-9)


def test_layerwise_bad_input():
    model, data, _ = hessian_case("tanh_mlp")
    with pytest.raises(ValueError, match="stats"):
        layerwise(model, F.cross_entropy, data, stats=("frobenius",))
    with pytest.raises(ValueError, match="forms no group"):
        layerwise(model, F.cross_entropy, data, by=r"attention")


def test_operator_ggn_gives_the_blocks_of_the_dense_ggn():
    model, data, _ = hessian_case("gelu_mlp")
    G = dense_ggn(model, F.cross_entropy, [data])
    blocks = _blocks(model, G, _module_groups(model))
    df = layerwise(model, F.cross_entropy, data, operator="ggn", rtol=0.02, max_matvecs=4000, eig_tol=1e-8,
                   eig_steps=200, seed=0, progress=False)
    exact_top = np.array([float(torch.linalg.eigvalsh(b)[-1]) for b in blocks])
    np.testing.assert_allclose(df["top_eig"].to_numpy(), exact_top, rtol=1e-6, atol=1e-9)
    z = (df["trace"].to_numpy() - np.array([float(b.trace()) for b in blocks])) / df["trace_stderr"].to_numpy()
    assert np.all(np.abs(z) < 4.5), z
    with pytest.raises(ValueError, match="operator must be one of"):
        layerwise(model, F.cross_entropy, data, operator="fisher")
    calls = []

    def factory(model, loss_fn, data, **kw):
        calls.append(sorted(kw))
        return GGNOperator(model, loss_fn, data, **kw)

    again = layerwise(model, F.cross_entropy, data, operator=factory, stats=("top_eig",), eig_tol=1e-8,
                      eig_steps=200, seed=0, progress=False, bn_mode="eval")
    np.testing.assert_allclose(again["top_eig"].to_numpy(), exact_top, rtol=1e-6, atol=1e-9)
    assert calls == [["bn_mode"]]


def test_block_traces_on_batches_use_stratified_probes_with_their_weights(monkeypatch):
    """Diagonal batch Hessians: every stratified sample of every block is exact, so the blocks' traces are too.

    Per-sample loss sum_j c_j u_j^2 + sum_j d_j v_j^2 (u, v: the two layers' weights) has the Hessian
    diag(2 mean_i c_ij, 2 mean_i d_ij) over unequal batches, whatever the probes.
    """
    model = torch.nn.Sequential(torch.nn.Linear(6, 1, bias=False), torch.nn.Linear(4, 1, bias=False)).double()
    g = torch.Generator().manual_seed(3)
    c, d = torch.rand(30, 6, generator=g, dtype=torch.float64), torch.rand(30, 4, generator=g, dtype=torch.float64)
    batches = [{"c": c[a:b], "d": d[a:b]} for a, b in ((0, 4), (4, 13), (13, 30))]

    def forward(m, batch):
        return ((batch["c"] * m[0].weight.square()).sum(1) + (batch["d"] * m[1].weight.square()).sum(1)).mean()

    from curvkit.hessian import HessianOperator

    drawn = []
    original = HessianOperator.stratified_samples
    monkeypatch.setattr(HessianOperator, "stratified_samples",
                        lambda self, k, gen: drawn.append(k) or original(self, k, gen))
    df = layerwise(model, None, batches, stats=("trace",), forward=forward, max_matvecs=12, seed=0)
    assert sum(drawn) == 10  # the first block reached rtol (every sample exact)
    np.testing.assert_allclose(df["trace"].to_numpy(), [2 * float(c.sum(1).mean()), 2 * float(d.sum(1).mean())])
    np.testing.assert_allclose(df["trace_stderr"].to_numpy(), 0.0, atol=1e-12)
