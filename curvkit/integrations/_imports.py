"""Importing an optional framework, with the install line when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or an ImportError naming ``pip install 'curvkit[extra]'`` when it is not installed.

    A framework that is installed but fails to import (a broken dependency) raises its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise
        raise ImportError(f"curvkit.integrations.{extra} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'curvkit[{extra}]'") from err
