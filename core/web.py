"""What HTTP views are made of, for core's routes and plugins' alike: JSON
responses, reading a JSON body or a body as a stream, and the admin key guard.

Admin routes, whichever plugin adds them, are guarded by `require_admin`: a
bearer token equal to the `STREAMVISOR_ADMIN_KEY` environment variable, compared
in constant time. Without that variable admin routes are disabled (403). The key
is only ever read from the `Authorization` header, never from the query string
(which ends up in logs and browser history).
"""

from __future__ import annotations

import functools
import hmac
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import orjson
import trio
from quart import Response, g, request

from .errors import APIError, InvalidRequest

ADMIN_KEY_ENV = "STREAMVISOR_ADMIN_KEY"
_JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson."""
    return Response(orjson.dumps(body), status=status, content_type=_JSON, headers=headers)


async def read_json(*, empty: Any = ...) -> Any:
    """The request body as JSON. An empty body is a 400, or `empty` when given;
    a body that is not JSON is a 400 that says why."""
    data = await request.get_data(cache=False)
    if not data or not data.strip():
        if empty is not ...:
            return empty
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None


async def body_chunks() -> AsyncIterator[bytes]:
    """The request's body as it arrives, piece by piece (contract 1.5), for a
    view that writes it somewhere instead of holding it.

    At most the route's limit comes in all (`[server] max_body_bytes`, or the
    route's own `max_body_bytes`): past it, or for a `Content-Length` past it,
    the iteration raises the 413 `request_too_large`. Memory holds a window
    of the body at a time: a client faster than the view is slowed down.
    While the body arrives, `[server] route_timeout_seconds` counts from the
    last piece received, so a large upload is bounded by its pace, not its
    size. A body can be read once: as a stream, or whole.
    """
    deadline = getattr(g, "streamvisor_route_deadline", None)
    async for chunk in request.body:
        if deadline is not None:
            scope, seconds = deadline
            scope.deadline = max(scope.deadline, trio.current_time() + seconds)
        if chunk:
            yield chunk


def admin_key() -> str | None:
    return os.environ.get(ADMIN_KEY_ENV) or None


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def require_admin(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Guard a quart view: 403 when admin is disabled, 401 for a missing or wrong key."""

    @functools.wraps(view)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        check_admin()
        return await view(*args, **kwargs)

    return guarded


def check_admin() -> None:
    """Raise unless the request carries the admin key: 403 when admin is
    disabled, 401 for a missing or wrong key."""
    key = admin_key()
    if key is None:
        raise APIError(
            f"Admin routes are disabled: set {ADMIN_KEY_ENV} to enable them.",
            status=403,
            type="permission_error",
            code="admin_disabled",
        )
    token = bearer_token(request.headers)
    if token is None or not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(
            "A valid admin key is required (Authorization: Bearer <key>).",
            status=401,
            type="authentication_error",
            code="invalid_admin_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
