r"""Pure-PyTorch references of the csrc/ kernels: same signatures, same arithmetic, any device.

They are what the kernels are tested against and what runs where no kernel is built. The in-place
ops mutate their first tensor lists exactly as the kernels do.

Rademacher probes come from Philox4x32-10 keyed by ``(seed, offset)`` (csrc/philox.h): the tensors of
one draw are numbered as one flat vector, element ``g`` takes bit ``g % 32`` of word ``(g // 32) % 4`` of
``philox(counter=(g // 128, offset), key=seed)`` and is ``+1`` for a 0 bit, ``-1`` for a 1 bit. Nothing
is stored, and the same ``(seed, offset)`` gives the same probes on every rank and device. uint32
arithmetic is emulated exactly with int64 tensors (products split into 16-bit halves, never overflowing).

>>> z = rademacher([torch.empty(3, 4), torch.empty(5)], seed=7, offset=0)   # +-1, bit-identical to the kernel's
>>> [tuple(t.shape) for t in z], bool(z[0].abs().eq(1).all())
([(3, 4), (5,)], True)
>>> acc, hz = [torch.zeros(3, 4), torch.zeros(5)], [torch.ones(3, 4), torch.ones(5)]
>>> dots = accumulate_zhz_(acc, hz, seed=7, offset=0)   # acc += z * hz; dots[j] = z_j . hz_j
>>> torch.equal(acc[0], z[0])
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
PROBES_PER_BLOCK = 128


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a uint32 constant ``a`` and int64 ``b`` in [0, 2^32)."""
    x = (b & 0xFFFF) * a            # < 2^48
    t = (b >> 16) * a + (x >> 16)   # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (x & 0xFFFF)


def philox4x32_10(counter: Sequence[torch.Tensor | int], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 of int64 counters (four uint32 words, tensors or ints) under a two-word key.

    >>> [hex(int(w)) for w in philox4x32_10([torch.zeros(1, dtype=torch.long)] * 4, (0, 0))]
    ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0) if isinstance(c0, torch.Tensor) else divmod(_M0 * c0, 1 << 32)
        hi1, lo1 = _mulhilo(_M1, c2) if isinstance(c2, torch.Tensor) else divmod(_M1 * c2, 1 << 32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return [c if isinstance(c, torch.Tensor) else torch.tensor(c) for c in (c0, c1, c2, c3)]


def check_seed(seed: int, offset: int) -> None:
    """Refuse a probe ``seed`` or ``offset`` outside [0, 2^64).

    Raises:
        ValueError: either is out of range.
    """
    if not (0 <= seed < 2**64 and 0 <= offset < 2**64):
        raise ValueError(f"seed and offset must be integers in [0, 2^64), got {seed!r} and {offset!r}")


def rademacher_flat(numel: int, seed: int, offset: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The first ``numel`` probes of draw ``(seed, offset)`` as one flat +-1 tensor."""
    check_seed(seed, offset)
    blocks = -(-numel // PROBES_PER_BLOCK)
    index = torch.arange(blocks, dtype=torch.int64, device=device)
    words = philox4x32_10([index & _MASK32, index >> 32, offset & _MASK32, offset >> 32],
                          (seed & _MASK32, seed >> 32))
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    bits = (torch.stack(words, 1).unsqueeze(2) >> shifts) & 1          # (blocks, 4, 32)
    return (1 - 2 * bits.reshape(-1)[:numel]).to(dtype)


def rademacher(like: Sequence[torch.Tensor], seed: int, offset: int) -> list[torch.Tensor]:
    """The probes of draw ``(seed, offset)`` as new contiguous tensors shaped like ``like``.

    The entries are numbered as one vector; each tensor has its model tensor's dtype and device.
    """
    sizes = [t.numel() for t in like]
    first = like[0]
    flat = rademacher_flat(sum(sizes), seed, offset, first.dtype, first.device)
    return [z.view(t.shape) if t.dtype == first.dtype and t.device == first.device else z.view(t.shape).to(t)
            for z, t in zip(flat.split(sizes), like)]


def rademacher_(out: Sequence[torch.Tensor], seed: int, offset: int) -> None:
    """Fill ``out`` with the probes of draw ``(seed, offset)`` (all tensors numbered as one vector)."""
    for o, z in zip(out, rademacher(out, seed, offset)):
        o.copy_(z)


def accumulate_zhz_(acc: Sequence[torch.Tensor], hz: Sequence[torch.Tensor], seed: int, offset: int,
                    alpha: float = 1.0, accumulate: bool = True) -> torch.Tensor:
    r"""``acc[j] = (acc[j] if accumulate else 0) + alpha * z_j * hz[j]`` with z the probes of draw ``(seed, offset)``.

    ``hz[j]`` may be ``acc[j]`` itself when ``accumulate`` is False.

    Returns:
        The float64 dots ``z_j . hz[j]`` (v.Hv per tensor; their sum for the trace).
    """
    if not acc:
        return torch.zeros(0, dtype=torch.float64)
    zhz = [z * h for z, h in zip(rademacher(acc, seed, offset), hz)]
    dots = torch.stack([p.sum(dtype=torch.float64) for p in zhz])
    for a, p in zip(acc, zhz):
        if accumulate:
            a.add_(p, alpha=alpha)
        else:
            a.copy_(p if alpha == 1 else p.mul_(alpha))
    return dots


def estimate(curvature: Sequence[torch.Tensor], probes: Sequence[torch.Tensor] | None = None,
             windows: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The curvature estimate the updates use.

    ``curvature`` itself, or ``probes * curvature`` (curvature = Hz), averaged over runs of ``windows[j]``
    consecutive entries of tensor j (a conv weight's kernel window).
    """
    d = [z * c for z, c in zip(probes, curvature)] if probes else list(curvature)
    if windows:
        d = [x if w == 1 else x.reshape(-1, w).mean(1, keepdim=True).expand(-1, w).reshape(x.shape)
             for x, w in zip(d, windows)]
    return d


def adahessian_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                     exp_hess_sq: list[torch.Tensor], curvature: list[torch.Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, hessian_power: float,
                     bias_correction1: Sequence[float], bias_correction2: Sequence[float], *,
                     probes: list[torch.Tensor] | None = None, windows: Sequence[int] | None = None,
                     next_probes: list[torch.Tensor] | None = None, probe_seed: int = 0, next_offset: int = 0) -> None:
    r"""One AdaHessian update of a parameter group (``curvature`` empty on steps that do not refresh it).

    .. math:: m \leftarrow \mathrm{lerp}(m, g, 1 - b_1), \quad v \leftarrow b_2 v + (1 - b_2) D^2, \quad
              \theta \leftarrow \theta (1 - lr\,wd) - \frac{lr}{bc_1} \frac{m}{(v / bc_2)^{k/2} + eps}

    with D = :func:`estimate` ``(curvature, probes, windows)``; then ``next_probes`` (which may be
    ``probes``) receive the probes of draw ``(probe_seed, next_offset)``.
    """
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    if curvature:
        d = estimate(curvature, probes, windows)
        torch._foreach_mul_(exp_hess_sq, beta2)
        torch._foreach_addcmul_(exp_hess_sq, d, d, value=1 - beta2)
    denom = torch._foreach_div(exp_hess_sq, list(bias_correction2))
    if hessian_power == 1:
        torch._foreach_sqrt_(denom)
    else:
        torch._foreach_pow_(denom, hessian_power / 2)
    torch._foreach_add_(denom, eps)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avg, denom, [-lr / bc for bc in bias_correction1])
    if next_probes:
        rademacher_(next_probes, probe_seed, next_offset)


def sophia_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                 hessian: list[torch.Tensor], curvature: list[torch.Tensor], lr: float, beta1: float, beta2: float,
                 rho: float, eps: float, weight_decay: float, *, probes: list[torch.Tensor] | None = None,
                 next_probes: list[torch.Tensor] | None = None, probe_seed: int = 0, next_offset: int = 0) -> None:
    r"""One Sophia update of a parameter group (``curvature`` empty on steps that do not refresh it).

    .. math:: m \leftarrow \mathrm{lerp}(m, g, 1 - b_1), \quad h \leftarrow b_2 h + (1 - b_2) \hat h, \quad
              \theta \leftarrow \theta (1 - lr\,wd) - lr\,\mathrm{clip}(m / \max(\rho h, eps), 1)

    with \hat h = :func:`estimate` ``(curvature, probes)``; ``next_probes`` as in :func:`adahessian_step_`.
    """
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    if curvature:
        torch._foreach_mul_(hessian, beta2)
        torch._foreach_add_(hessian, estimate(curvature, probes), alpha=1 - beta2)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = torch._foreach_mul(hessian, rho)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avg, denom)
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_add_(params, ratio, alpha=-lr)
    if next_probes:
        rademacher_(next_probes, probe_seed, next_offset)


def softmax_ce_hessian_product(logits: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    r"""``scale * (diag(p) - p p^T) u`` per row, p = softmax(logits) over dim 1.

    This is the output Hessian of softmax cross-entropy (``scale`` = 1/B for a mean over B rows) applied to ``u``.
    """
    p = torch.softmax(logits, dim=1)
    pu = p * u
    return scale * (pu - p * pu.sum(1, keepdim=True))
