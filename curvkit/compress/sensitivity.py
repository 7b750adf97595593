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
from .._utils.borrow import BorrowedLoss, ForwardFn, require_materialised
from .._utils.layers import WEIGHT_LAYERS
from .._utils.random import Seed
from ..hessian import layerwise

GRANULARITIES = ("layer", "channel")


def weight_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear/Conv modules with a trainable weight (by name), and a note for every other module with parameters.

    Raises:
        ValueError: the model is on the meta device, or has no trainable Linear/Conv layer.
    """
    require_materialised(model)
    layers, skipped = {}, []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, WEIGHT_LAYERS) and "weight" in own:
            layers[name] = module
        else:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}): not a Linear/Conv layer, skipped")
    if not layers:
        raise ValueError("the model has no trainable Linear or Conv layer to compress")
    return layers, skipped


def count_macs(model: nn.Module, loss_fn: Any, data: Any, layers: dict[str, nn.Module], *,
               forward: ForwardFn | None = None) -> dict[str, float]:
    """Multiply-accumulates per sample of each layer, recorded with forward hooks on the first batch.

    The model is called as the engine calls it (:class:`~curvkit._utils.borrow.BorrowedLoss`:
    ``forward(model, batch)``, by default ``loss_fn(model(inputs), targets)``, with running statistics
    and private buffers, no mode changed), without gradients.
    """
    macs: dict[str, float] = {}
    batch = next(iter(as_batches(data)))
    samples = batch_size(batch)

    def hook(name):
        def record(module, args, output):
            per_output = module.weight[0].numel()  # in_features, or in_channels/groups * kernel size
            macs[name] = output.numel() / samples * per_output
        return record

    device = next(iter(layers.values())).weight.device
    borrowed = BorrowedLoss(model, loss_fn, [], forward=forward)
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            borrowed.evaluate([], to_device(batch, device))
    finally:
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
    are listed in ``df.attrs["skipped"]``. ``operator_kwargs`` go to :func:`~curvkit.hessian.layerwise`
    (``operator``, ``forward``, ``bn_mode``, ``max_block``, ...); ``forward=lambda model, batch: loss`` is
    also how the MACs are counted, so dict batches (Hugging Face models) work. The model is borrowed,
    never changed (modes, parameters, buffers, ``.grad``).

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> sens = sensitivity(model, F.cross_entropy, (x, y), granularity="layer", seed=0, progress=False)
    >>> sens["module"].tolist(), sens["n_params"].tolist()
    (['0', '2'], [128, 48])
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
        macs = count_macs(model, loss_fn, data, layers, forward=operator_kwargs.get("forward"))
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
