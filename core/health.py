"""Readiness checks and the admin key: what health and admin routes stand on.

Plugins add readiness checks with the `register_health_checks` hook; a check is an
``async def check()`` returning `Health` (or a bool). Admin routes, whichever
plugin adds them, are guarded by `require_admin`: a bearer token equal to the
`STREAMVISOR_ADMIN_KEY` environment variable. Without that variable admin routes
are disabled.
"""

from __future__ import annotations

import functools
import hmac
import os
from typing import Any, Awaitable, Callable

import attrs
from quart import request

from .errors import APIError

ADMIN_KEY_ENV = "STREAMVISOR_ADMIN_KEY"


@attrs.frozen
class Health:
    ok: bool
    #: Why: a short reason, or a dict of details, shown in /health/ready.
    detail: Any = None


HealthCheck = Callable[[], Awaitable["Health | bool"]]


def admin_key() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None


def require_admin(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Guard a quart view: 403 when admin is disabled, 401 for a missing or wrong key."""

    @functools.wraps(view)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        key = admin_key()
        if key is None:
            raise APIError(
                f"Admin routes are disabled: set {ADMIN_KEY_ENV} to enable them.",
                status=403,
                type="permission_error",
                code="admin_disabled",
            )
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                "A valid admin key is required (Authorization: Bearer <key>).",
                status=401,
                type="authentication_error",
                code="invalid_admin_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await view(*args, **kwargs)

    return guarded
