"""Curvature analysis: loss landscapes, spectra and sharpness tracking, built on the Hessian engine.

>>> from curvkit.analysis import random_direction, landscape_2d
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
>>> land = landscape_2d(model, F.cross_entropy, (x, y), d1, d2, steps=5)
>>> land.loss.shape
(5, 5)
>>> fig = land.plot()          # a matplotlib Figure: fig.savefig("landscape.png")
"""

from .directions import direction_to, eigen_direction, random_direction
from .landscape import Landscape, landscape_1d, landscape_2d
from .sharpness import SharpnessTracker, stability

__all__ = ["random_direction", "eigen_direction", "direction_to", "landscape_1d", "landscape_2d", "Landscape",
           "SharpnessTracker", "stability"]
