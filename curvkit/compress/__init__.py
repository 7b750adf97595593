"""Compression from curvature: Hessian sensitivity, HAWQ mixed-precision quantization, HAP channel pruning,
and magnitude / N:M weight pruning.

>>> from curvkit.compress import sensitivity, mixed_precision, quantize
>>> sens = sensitivity(model, F.cross_entropy, (x, y), granularity="layer", seed=0)
>>> qmodel = quantize(model, mixed_precision(model, sens, max_weight_bits=4 * sens.n_params.sum()).bits)
"""

from .masks import magnitude_masks, nm_masks
from .prune import Implanted, channel_scores, prune_channels, recalibrate_bn, remove_channels
from .quantize import MixedPrecision, mixed_precision, perturbation, quantize, quantize_weight
from .sensitivity import sensitivity
from .weight_pruning import prune_weights

__all__ = ["sensitivity", "mixed_precision", "quantize", "quantize_weight", "perturbation", "MixedPrecision",
           "prune_channels", "channel_scores", "remove_channels", "recalibrate_bn", "Implanted",
           "prune_weights", "magnitude_masks", "nm_masks"]
