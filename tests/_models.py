"""Small models of several kinds and exact dense Hessians (float64) to test against."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvkit._utils.borrow import twice_differentiable


class TinyAttention(nn.Module):
    """One self-attention block (scaled_dot_product_attention) with a residual and a linear read-out."""

    def __init__(self, tokens: int = 4, dim: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim * tokens, classes)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.norm(h + F.scaled_dot_product_attention(q, k, v))
        return self.head(h.flatten(1))


def make_model(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small float64 model in eval mode with a batch (x, y) for cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "tanh_mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(24, 5, generator=g)
    elif kind == "gelu_mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
        x = torch.randn(24, 4, generator=g)
    elif kind == "conv_bn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(16, 1, 6, 6, generator=g)
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5, generator=g)
            model[1].running_var.uniform_(0.5, 2.0, generator=g)
    elif kind == "attention":
        model = TinyAttention()
        x = torch.randn(12, 4, 2, generator=g)
    else:
        raise ValueError(kind)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return model.double().eval(), x.double(), y


MODEL_KINDS = ["tanh_mlp", "gelu_mlp", "conv_bn", "attention"]


class TokenBag(nn.Module):
    """Mean of tanh'd token embeddings, then a linear classifier; ``sparse`` embedding gradients or dense."""

    def __init__(self, sparse: bool, vocab: int = 10, dim: int = 4, classes: int = 3, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, sparse=sparse, padding_idx=padding_idx)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


def token_bag_twins(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The same float64 TokenBag with sparse and with dense embedding gradients, token ids and labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sparse = TokenBag(sparse=True).double().eval()
    dense = TokenBag(sparse=False).double().eval()
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense, torch.randint(0, 10, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)


def dense_hessian(model: nn.Module, loss_fn, batches, names=None) -> torch.Tensor:
    """Exact Hessian of the sample-weighted mean loss over ``batches`` (torch.autograd.functional.hessian).

    Not torch.func.hessian: in torch 2.13 its vmapped double backward through LayerNorm disagrees
    with finite differences, while plain double backward agrees.
    """
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        chunks = [c.view(s) for c, s in zip(torch.split(flat, sizes), shapes)]
        tensors = dict(zip(names, chunks))
        return sum(len(y) * loss_fn(functional_call(model, tensors, (x,)), y) for x, y in batches) / total

    with twice_differentiable():
        return torch.autograd.functional.hessian(loss, flat0)


def dense_ggn(model, loss_fn, batches, names=None) -> torch.Tensor:
    """Sample-weighted sum over batches of J^T H_out J, by torch.autograd.functional jacobian and hessian."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    sizes = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    total = sum(len(y) for _, y in batches)
    G = torch.zeros(len(flat0), len(flat0))
    for x, y in batches:
        def outputs(flat):
            chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes)]
            return functional_call(model, dict(zip(names, chunks)), (x,))

        z = outputs(flat0).detach()
        J = torch.autograd.functional.jacobian(outputs, flat0, vectorize=True).reshape(z.numel(), -1)
        H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(z), y), z.reshape(-1), vectorize=True)
        G += len(y) / total * J.T @ H_out @ J
    return G


@functools.cache
def hessian_case(kind: str):
    """(model, batch, dense Hessian) of ``make_model(kind)``, cached: curvkit must never mutate the model."""
    model, x, y = make_model(kind)
    return model, (x, y), dense_hessian(model, F.cross_entropy, [(x, y)])


def spectrum_matrix(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given eigenvalues and a random orthogonal eigenbasis."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (Q * eigs) @ Q.T


def model_state(model: nn.Module) -> tuple:
    """Everything curvkit must leave alone: state dict, every module's mode, .grad, requires_grad, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, m.training) for name, m in model.named_modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def assert_same_state(before: tuple, after: tuple) -> None:
    """``model_state`` before and after a call are identical (tensors bit for bit)."""
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1] == after[1], [b for b, a in zip(before[1], after[1]) if b != a]
    assert [g is None for g in before[2]] == [g is None for g in after[2]]
    assert all(g is None or torch.equal(g, h) for g, h in zip(before[2], after[2]))
    assert before[3:] == after[3:]


def assert_untouched_by(call) -> None:
    """Run ``call(model, x, y)`` on a train-mode conv+BN model with a set .grad and a frozen parameter,
    and check that parameters, buffers, modes, .grad and requires_grad are exactly as before."""
    model, x, y = make_model("conv_bn")
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[4].bias.requires_grad_(False)
    before = model_state(model)
    call(model, x, y)
    assert_same_state(before, model_state(model))


class MixedModes(nn.Module):
    """A train-mode wrapper around an eval-mode body (BatchNorm, Dropout) and a train-mode head with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 4))
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.head(self.body(x))


def mixed_modes_case(seed: int = 0) -> tuple[nn.Module, list]:
    """A float64 MixedModes (body in eval mode, the rest in train mode, a .grad set, a frozen parameter) and data."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MixedModes().double().train()
    model.body.eval()
    model.body[0].weight.grad = torch.ones_like(model.body[0].weight)
    model.head[2].bias.requires_grad_(False)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    return model, [(x[:9], y[:9]), (x[9:], y[9:])]


class DictClassifier(nn.Module):
    """``net`` called like a Hugging Face model: ``model(**batch)`` with the labels inside; ``.loss``, ``.logits``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, features, labels=None):
        logits = self.net(features)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def loss_of_dict_batch(model: nn.Module, batch: dict) -> torch.Tensor:
    """The ``forward=`` hook of :class:`DictClassifier`: the loss the model computes from a dict batch."""
    return model(**batch).loss


def dict_twins(seed: int = 0) -> tuple[nn.Module, list, nn.Module, list]:
    """A float64 MLP with BatchNorm on (inputs, targets) pairs, and the same MLP in a DictClassifier on dicts."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                        nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    pairs = [(x[:12], y[:12]), (x[12:], y[12:])]
    return net, pairs, DictClassifier(net), [{"features": a, "labels": b} for a, b in pairs]


def small_classifier(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 6-8-3 tanh MLP with weights and a batch of 32 drawn from ``seed`` alone (the optimizer tests' model)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter of ``model``, detached and concatenated."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])
