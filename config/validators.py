"""attrs validators for settings classes, shared by the core and every plugin.

Each lets `None` through (an optional setting left unset) and raises ValueError
with a message naming the setting; `build_settings` turns that into a
`ConfigError` that names the file and the table.
"""

from __future__ import annotations

from typing import Any

import attrs


def positive(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value}")


def not_negative(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value}")


def at_least_one(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")
