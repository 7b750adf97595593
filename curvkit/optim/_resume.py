"""Resuming from a state dict: the optimizer-wide settings it was saved with must be the optimizer's own."""

from __future__ import annotations

from typing import Any


def require_same_settings(saved: dict[str, Any] | None, mine: dict[str, Any], optimizer: str) -> None:
    """Refuse a state saved with other optimizer-wide settings (resuming would silently change the run).

    Args:
        saved: the settings stored in the state dict (None: a state dict from before settings were saved).
        mine: this optimizer's settings.
        optimizer: the class name, for the message.

    Raises:
        ValueError: a setting differs, or one is missing on either side; the message lists (saved, here).
    """
    if saved is None or saved == mine:
        return
    different = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
    raise ValueError(f"the state dict was saved with other optimizer-wide settings (saved, here): {different}; "
                     f"construct {optimizer} with the saved settings to resume")
