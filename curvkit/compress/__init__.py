"""Compression from curvature: sensitivity, HAWQ mixed precision, HAP channel pruning, weight pruning.

Hessian sensitivity of layers and channels feeds mixed-precision quantization (HAWQ) and channel
pruning (HAP, exact quadratic scores); magnitude and N:M weight masks are shared with CrAM.

>>> from curvkit.compress import sensitivity, mixed_precision, quantize
>>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
>>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
>>> sens = sensitivity(model, F.cross_entropy, (x, y), granularity="layer", seed=0, progress=False)
>>> plan = mixed_precision(model, sens, bits=(2, 4, 8), max_weight_bits=4 * sens.n_params.sum())
>>> qmodel = quantize(model, plan.bits)
>>> sorted(plan.bits) == ["0", "2"] and bool(plan.weight_bits <= 4 * sens.n_params.sum())
True
"""

from .masks import magnitude_masks, nm_masks
from .prune import Implanted, channel_scores, prune_channels, recalibrate_bn
from .quantize import MixedPrecision, mixed_precision, perturbation, quantize, quantize_weight
from .sensitivity import sensitivity
from .surgery import remove_channels
from .weight_pruning import prune_weights

__all__ = ["sensitivity", "mixed_precision", "quantize", "quantize_weight", "perturbation", "MixedPrecision",
           "prune_channels", "channel_scores", "remove_channels", "recalibrate_bn", "Implanted",
           "prune_weights", "magnitude_masks", "nm_masks"]
