"""Weight layers (Linear and Conv), the modules whose output channels curvkit scores, prunes and quantizes."""

from __future__ import annotations

from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def qualified(module_name: str, param_name: str) -> str:
    """The full parameter name of ``param_name`` owned by the module ``module_name`` ("" for the root)."""
    return f"{module_name}.{param_name}" if module_name else param_name
