"""Signing in to the console: a cookie that holds who signed in, signed.

The console is a browser's, so it cannot send `Authorization: Bearer` on every
request (an EventSource cannot send headers at all). Signing in with the admin
key or an API key (checked exactly as `/v1` checks it, `runtime.authenticate`)
gives a cookie:

- its value is the principal (identity, team, role, key id), when it was
  issued, and an HMAC-SHA256 of both; the key itself is never kept;
- `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page
  sends it), `Secure` when the console is served over https (or on a loopback
  address, which browsers count as secure), `Path=/console`;
- it expires after `session_hours`.

Every action (a POST) also needs the CSRF token in the `X-CSRF-Token` header:
an HMAC of the cookie, printed into the console's pages; and a request whose
`Origin` is another site's is refused. The signing key is the console's
`secret`, else derived from the admin key, else random per process (sign-ins
then end with a restart, and are not shared by instances).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from typing import Any

import orjson

from streamvisor.hooks import ANONYMOUS, ADMIN_KEY_ENV, Principal

COOKIE = "sv_console"


class Signer:
    def __init__(self, secret: str) -> None:
        if secret:
            key = secret.encode()
        elif os.environ.get(ADMIN_KEY_ENV):
            key = hmac.new(os.environ[ADMIN_KEY_ENV].encode(), b"streamvisor console cookies", hashlib.sha256).digest()
        else:
            key = secrets.token_bytes(32)
        self._key = key

    def _mac(self, data: bytes, purpose: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, purpose + b"|" + data, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, principal: Principal, now: float | None = None) -> str:
        body = orjson.dumps({"i": principal.identity, "t": principal.team, "r": principal.role, "k": principal.key_id, "at": int(now or time.time())})
        data = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{data}.{self._mac(data.encode(), b'cookie')}"

    def read(self, cookie: str | None, max_age: float, now: float | None = None) -> Principal | None:
        """The principal of a cookie this console issued and that has not
        expired, or None."""
        if not cookie or "." not in cookie:
            return None
        data, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(data.encode(), b"cookie")):
            return None
        try:
            body: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
            if (now or time.time()) - float(body["at"]) > max_age:
                return None
            return Principal(identity=body["i"], team=body["t"], role=body["r"], key_id=body["k"])
        except (ValueError, KeyError, TypeError):
            return None

    def csrf(self, cookie: str) -> str:
        return self._mac(cookie.encode(), b"csrf")

    def csrf_ok(self, cookie: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token or "", self.csrf(cookie))


def describe(principal: Principal) -> str:
    if principal.role == "admin":
        return "admin"
    if principal is ANONYMOUS or principal.role == "anonymous":
        return "anonymous"
    return principal.identity + (f" ({principal.team})" if principal.team else "")
