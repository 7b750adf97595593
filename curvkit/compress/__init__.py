"""Compression from curvature: Hessian sensitivity, HAWQ mixed-precision quantization, HAP channel pruning.

>>> from curvkit.compress import sensitivity, mixed_precision, quantize
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
>>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
>>> sens = sensitivity(model, F.cross_entropy, (x, y), granularity="layer", seed=0)
>>> qmodel = quantize(model, mixed_precision(model, sens, max_weight_bits=4 * sens.n_params.sum()).bits)
"""

from .prune import Implanted, channel_scores, prune_channels, recalibrate_bn, remove_channels
from .quantize import MixedPrecision, mixed_precision, perturbation, quantize, quantize_weight
from .sensitivity import sensitivity

__all__ = ["sensitivity", "mixed_precision", "quantize", "quantize_weight", "perturbation", "MixedPrecision",
           "prune_channels", "channel_scores", "remove_channels", "recalibrate_bn", "Implanted"]
