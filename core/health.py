"""Readiness: what a check returns.

Plugins add readiness checks with the `register_health_checks` hook; a check is an
``async def check()`` returning `Health` (or a bool). The health plugin runs them
for `/health/ready`.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import attrs


@attrs.frozen
class Health:
    ok: bool
    #: Why: a short reason, or a dict of details, shown in /health/ready.
    detail: Any = None


HealthCheck = Callable[[], Awaitable["Health | bool"]]
