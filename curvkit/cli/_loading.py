"""What the analysis commands share: the options naming a user's model, weights, data and loss, and loading them.

``--model``, ``--data`` and ``--loss`` take ``module:name`` specs, imported the way ``python -m`` would
(the current folder comes first on the import path). The model is built (or taken), loaded with
``--weights`` through ``torch.load(weights_only=True)``, moved to ``--device`` and put in eval mode
(Dropout off; BatchNorm follows ``--bn-mode``); this instance belongs to the command, so the user's code
and files are never changed. Every way this can fail raises :class:`CommandError` with one line that
says what was wrong and what to do, before any curvature is computed: the first batch is run through
the model and the loss as a check.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._utils.batches import batch_size, is_single_batch, to_device
from .._utils.borrow import BN_MODES, select_parameters

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "nll": F.nll_loss,
          "bce_with_logits": F.binary_cross_entropy_with_logits}


class CommandError(Exception):
    """A failure the user can fix; its message is the single line the command prints."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every analysis command takes (model, weights, data, loss, device, seed, output).

    Args:
        parser: an analysis command's subparser.
    """
    group = parser.add_argument_group("your model and data")
    group.add_argument("--model", required=True, metavar="MODULE:NAME",
                       help="a function returning your nn.Module (called with no arguments), or an nn.Module object")
    group.add_argument("--weights", metavar="FILE",
                       help="a state_dict saved with torch.save(model.state_dict(), FILE); loaded with "
                            "weights_only=True, so a file that would run code is refused")
    group.add_argument("--data", required=True, metavar="MODULE:NAME",
                       help="a function returning one (inputs, targets) batch or a re-iterable of batches "
                            "(a list, a DataLoader), or such an object")
    group.add_argument("--loss", default="cross_entropy", metavar="NAME",
                       help=f"{', '.join(LOSSES)} (default: cross_entropy), or MODULE:NAME of a function "
                            "loss(outputs, targets) -> scalar or an nn.Module loss class")
    group.add_argument("--max-batches", type=positive_int, metavar="N",
                       help="use only the first N batches (kept in memory, so every pass sees the same ones)")
    group.add_argument("--params", nargs="+", metavar="GLOB",
                       help="analyse only the parameters whose names match these globs (e.g. 'fc.*' 'layer4.*')")
    group.add_argument("--bn-mode", choices=BN_MODES, default="eval",
                       help="BatchNorm uses running statistics (eval, default) or batch statistics (batch)")
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    group.add_argument("--seed", type=int, default=0, help="seeds every random probe and direction (default 0)")
    group.add_argument("--out", default="curvkit-report", metavar="DIR",
                       help="folder for the figures, tables and summary.json, which keeps one entry per command "
                            "(default: curvkit-report)")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, or a usage error naming the value."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


@dataclass
class Inputs:
    """A loaded model, loss and data, ready for the engine.

    Attributes:
        model: the command's own instance, with the weights loaded, on ``device``, in eval mode.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: a re-iterable of ``(inputs, targets)`` batches.
        device: where the model lives (batches are moved there by the engine).
        params: the parameter names selected by ``--params`` (None: every trainable one).
        bn_mode: ``"eval"`` or ``"batch"``.
        n_batches: how many batches one pass over ``data`` has.
        n_samples: how many samples one pass over ``data`` has.
    """

    model: nn.Module
    loss_fn: Any
    data: Any
    device: torch.device
    params: list[str] | None
    bn_mode: str
    n_batches: int
    n_samples: int

    @property
    def operator_kwargs(self) -> dict[str, Any]:
        """The keywords that select parameters and the BatchNorm mode in the engine."""
        return {"params": self.params, "bn_mode": self.bn_mode}


def load(args: argparse.Namespace) -> Inputs:
    """Load everything the options name, checking the first batch through the model and the loss.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The loaded :class:`Inputs`.

    Raises:
        CommandError: anything the options name cannot be loaded or does not fit together.
    """
    device = _device(args.device)
    loss_fn = _loss(args.loss)
    model = _model(args.model)
    if args.weights is not None:
        _load_weights(model, Path(args.weights), args.model)
    model.to(device).eval()
    params = None
    if args.params:
        try:
            params = select_parameters(model, args.params)[0]
        except ValueError as exc:
            raise CommandError(f"--params: {exc}") from exc
    data, n_batches, n_samples = _data(args.data, args.max_batches)
    _check_first_batch(model, loss_fn, data, device, args)
    return Inputs(model, loss_fn, data, device, params, args.bn_mode, n_batches, n_samples)


def describe(args: argparse.Namespace, inputs: Inputs) -> dict[str, Any]:
    """What a run was given, for its summary.json.

    Args:
        args: the parsed options.
        inputs: what they loaded.

    Returns:
        A JSON-ready dict of the options, the data's size and the versions.
    """
    from .. import __version__

    return {"command": args.command, "model": args.model, "weights": args.weights, "data": args.data,
            "loss": args.loss, "device": str(inputs.device), "seed": args.seed, "params": inputs.params,
            "bn_mode": args.bn_mode, "max_batches": args.max_batches, "n_batches": inputs.n_batches,
            "n_samples": inputs.n_samples, "curvkit": __version__, "torch": torch.__version__}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _import(spec: str, option: str) -> Any:
    """The object ``module:name`` names (``name`` may be dotted), imported with the current folder first."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise CommandError(f"{option} {spec!r}: expected MODULE:NAME, e.g. mypkg.models:make_net")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise CommandError(f"{option} {spec}: there is no module {exc.name!r} in {cwd} or on the Python path; "
                               "run curvkit in the folder that holds it, or add that folder to PYTHONPATH") from exc
        raise CommandError(f"{option} {spec}: importing {module_name} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise CommandError(f"{option} {spec}: importing {module_name} failed: {_one_line(exc)}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{option} {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call(fn: Any, spec: str, option: str) -> Any:
    """``fn()``, with any exception it raises turned into one line naming the option."""
    try:
        return fn()
    except Exception as exc:
        hint = " (curvkit calls it with no arguments)" if isinstance(exc, TypeError) else ""
        raise CommandError(f"{option} {spec}: calling it raised {_one_line(exc)}{hint}") from exc


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CommandError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CommandError(f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
                               "use --device cpu")
        if device.index is not None and device.index >= count:
            raise CommandError(f"--device {name}: there is no such CUDA device (this machine has {count}: "
                               f"cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CommandError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise CommandError(f"--device {name}: curvkit's command line runs on cpu, cuda or mps")
    return device


def _loss(spec: str) -> Any:
    if ":" not in spec:
        if spec not in LOSSES:
            raise CommandError(f"--loss {spec!r}: use one of {', '.join(LOSSES)}, or MODULE:NAME of your own loss")
        return LOSSES[spec]
    loss = _import(spec, "--loss")
    if isinstance(loss, type) and issubclass(loss, nn.Module):
        loss = _call(loss, spec, "--loss")
    if not callable(loss):
        raise CommandError(f"--loss {spec} is a {type(loss).__name__}, not a function loss(outputs, targets)")
    return loss


def _model(spec: str) -> nn.Module:
    model = _import(spec, "--model")
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise CommandError(f"--model {spec} is a {type(model).__name__}, not an nn.Module or a function "
                               "returning one")
        model = _call(model, spec, "--model")
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    if not path.is_file():
        raise CommandError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # whatever a pickle calls on loading, it must import first: the import was refused
            raise CommandError(f"--weights {path}: refused: it would import {found.group(1)} when unpickled, which "
                               "can run code; save only the weights with torch.save(model.state_dict(), path)") from exc
        detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(exc), re.DOTALL)
        reason = " ".join((detail.group(1) if detail else str(exc)).split())
        raise CommandError(f"--weights {path}: not a state_dict file written by torch.save (unpickling with "
                           f"weights_only=True stopped: {reason})") from exc
    except Exception as exc:
        raise CommandError(f"--weights {path}: not a file written by torch.save ({_one_line(exc)})") from exc
    if not (isinstance(state, Mapping) and all(isinstance(v, torch.Tensor) for v in state.values())):
        if isinstance(state, Mapping):
            kind = f"a dict with non-tensor entries ({_few([k for k, v in state.items() if not torch.is_tensor(v)])})"
        else:
            kind = f"a {type(state).__name__}"
        raise CommandError(f"--weights {path} holds {kind}, not a state_dict; save it with "
                           "torch.save(model.state_dict(), path)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = ([f"missing {_few(missing)}"] if missing else []) + \
                   ([f"unexpected {_few(unexpected)}"] if unexpected else []) + \
                   ([f"shapes differ: {_few(shapes, 2)}"] if shapes else [])
        prefixed = unexpected and all(k.startswith("module.") for k in unexpected)
        hint = " (the keys start with 'module.': save model.module.state_dict())" if prefixed else ""
        raise CommandError(f"--weights {path} does not fit --model {spec}: {'; '.join(problems)}{hint}; "
                           "save the state_dict of the model that --model builds")
    model.load_state_dict(state)


class _FirstBatches:
    """The first ``n`` batches of an iterable, taken once and kept, so that every pass sees the same ones."""

    def __init__(self, batches: Iterable[Any], n: int):
        self.batches = list(itertools.islice(batches, n))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} {'tensors' if is_single_batch(value) else 'items'}"
    return f"a {type(value).__name__}"


def _data(spec: str, max_batches: int | None) -> tuple[Any, int, int]:
    """The data ``spec`` names, limited to ``max_batches``, with its batch and sample counts (one pass)."""
    data = _import(spec, "--data")
    if callable(data) and not isinstance(data, (torch.Tensor, Iterable)):
        data = _call(data, spec, "--data")
    if is_single_batch(data):
        if not _is_pair(data):
            raise CommandError(f"--data {spec} returned {_kind(data)}: return one (inputs, targets) pair, or a "
                               "list or DataLoader of such pairs")
        batches = [data]
    elif isinstance(data, Iterable) and iter(data) is data:
        raise CommandError(f"--data {spec} returned a one-shot iterator ({type(data).__name__}); curvature needs "
                           "several passes over the data: return a list of batches or a DataLoader")
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        batches = data if max_batches is None else _FirstBatches(data, max_batches)
    else:
        raise CommandError(f"--data {spec} returned a {type(data).__name__}, not an (inputs, targets) batch "
                           "or a re-iterable of batches")
    n_batches = n_samples = 0
    for i, batch in enumerate(batches):
        if not _is_pair(batch):
            raise CommandError(f"--data {spec}: batch {i} is {_kind(batch)}, not a pair (inputs, targets) of tensors")
        n_batches += 1
        n_samples += batch_size(batch)
    if n_samples == 0:
        raise CommandError(f"--data {spec} gave no samples")
    return batches, n_batches, n_samples


def _check_first_batch(model: nn.Module, loss_fn: Any, data: Any, device: torch.device,
                       args: argparse.Namespace) -> None:
    """Run the first batch through the model and the loss, so a mismatch is reported in one line, early."""
    inputs, targets = to_device(next(iter(data)), device)
    with warnings.catch_warnings(record=True) as caught:  # shown only if the check passes: the error says it all
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                outputs = model(inputs)
        except Exception as exc:
            raise CommandError(f"--model {args.model} failed on the first batch of --data {args.data} (inputs of "
                               f"shape {tuple(inputs.shape)}): {_one_line(exc)}") from exc
        try:
            with torch.no_grad():
                loss = loss_fn(outputs, targets)
        except Exception as exc:
            shapes = f"outputs {_shape(outputs)} and targets {_shape(targets)}"
            raise CommandError(f"--loss {args.loss} failed on the model's {shapes}: {_one_line(exc)}; "
                               "cross_entropy takes class indices, mse targets shaped like the outputs") from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise CommandError(f"--loss {args.loss} returned {_shape(loss)}, not a scalar; use a mean reduction")


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return f"a {type(value).__name__}"
