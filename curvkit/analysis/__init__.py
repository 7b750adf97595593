"""Curvature analysis: loss landscapes, spectra and sharpness tracking, built on the Hessian engine.

>>> from curvkit.analysis import random_direction, landscape_2d
>>> d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
>>> landscape_2d(model, F.cross_entropy, (x, y), d1, d2).plot().savefig("landscape.png")
"""

from .directions import direction_to, eigen_direction, random_direction
from .landscape import Landscape, landscape_1d, landscape_2d
from .sharpness import SharpnessTracker, stability

__all__ = ["random_direction", "eigen_direction", "direction_to", "landscape_1d", "landscape_2d", "Landscape",
           "SharpnessTracker", "stability"]
