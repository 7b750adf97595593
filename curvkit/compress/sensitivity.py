r"""Curvature sensitivity of layers and channels, the common input of quantization and pruning.

For a layer i with n_i weights, HAWQ-v2 uses the mean eigenvalue tr(H_ii)/n_i; HAP scores a channel c
by tr(H_cc)/n_c * ||w_c||^2. Traces come from :func:`curvkit.hessian.layerwise` with adaptive probe
counts (stop when every block's relative standard error is below ``rtol``), not a fixed few probes.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from .._utils.batches import as_batches, batch_size, to_device
from .._utils.random import Seed
from ..hessian import layerwise

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
GRANULARITIES = ("layer", "channel")


def weight_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear/Conv modules with a trainable weight (by name), and a note for every other module with parameters."""
    layers, skipped = {}, []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, QUANTIZABLE) and "weight" in own:
            layers[name] = module
        else:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}): not a Linear/Conv layer, skipped")
    if not layers:
        raise ValueError("the model has no trainable Linear or Conv layer to compress")
    return layers, skipped


def count_macs(model: nn.Module, data: Any, layers: dict[str, nn.Module]) -> dict[str, float]:
    """Multiply-accumulates per sample of each layer, recorded with forward hooks on the first batch."""
    macs: dict[str, float] = {}
    batch = next(iter(as_batches(data)))
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    samples = batch_size(inputs)

    def hook(name):
        def record(module, args, output):
            per_output = module.weight[0].numel()  # in_features, or in_channels/groups * kernel size
            macs[name] = output.numel() / samples * per_output
        return record

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(to_device(inputs, device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def sensitivity(model: nn.Module, loss_fn: Any, data: Any, granularity: str = "layer", rtol: float = 0.05,
                seed: Seed = 0, *, max_matvecs: int | None = None, progress: bool | None = None,
                **operator_kwargs: Any) -> pd.DataFrame:
    r"""Hessian sensitivity of every Linear/Conv layer (``"layer"``) or output channel (``"channel"``).

    Layer rows: ``module, n_params, trace, trace_stderr, mean_eig (= trace / n_params), weight_sq
    (= ||W||^2), macs`` (per sample). Channel rows: ``module, channel, n_params, trace, trace_stderr,
    weight_sq (= ||w_c||^2 incl. bias), hap (= trace / n_params * weight_sq)``. Traces are of the
    weight blocks only for layers, of weight[c] and bias[c] for channels. Other modules with parameters
    are listed in ``df.attrs["skipped"]``.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> sens = sensitivity(model, F.cross_entropy, (x, y), granularity="layer", seed=0)
    >>> sens[["module", "n_params"]].values.tolist()
    [['0', 32], ['2', 24]]
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    layers, skipped = weight_layers(model)
    budget = max_matvecs if max_matvecs is not None else (500 if granularity == "layer" else 1000)
    if granularity == "layer":
        weights = [m.weight for m in layers.values()]
        df = layerwise(model, loss_fn, data, stats=("trace",), by="module", seed=seed, rtol=rtol, max_matvecs=budget,
                       progress=progress, params=weights, **operator_kwargs)
        df["mean_eig"] = df["trace"] / df["n_params"]
        df["weight_sq"] = [float(layers[m].weight.detach().double().square().sum()) for m in df["module"]]
        macs = count_macs(model, data, layers)
        df["macs"] = [macs.get(m, 0.0) for m in df["module"]]
    else:
        params = [p for m in layers.values() for p in (m.weight, m.bias) if p is not None and p.requires_grad]
        df = layerwise(model, loss_fn, data, stats=("trace",), by="channel", seed=seed, rtol=rtol, max_matvecs=budget,
                       progress=progress, params=params, **operator_kwargs)
        df["weight_sq"] = [_channel_sq(layers[m], c) for m, c in zip(df["module"], df["channel"])]
        df["hap"] = df["trace"] / df["n_params"] * df["weight_sq"]
    df.attrs["skipped"] = skipped
    return df.reset_index(drop=True)


def _channel_sq(module: nn.Module, c: int) -> float:
    sq = float(module.weight[c].detach().double().square().sum())
    if module.bias is not None:
        sq += float(module.bias[c].detach().double().square())
    return sq
