"""Who is asking, and whether they may (contract 1.2).

Every request to a `/v1` route has a `Principal`. Without a plugin that
authenticates requests it is `ANONYMOUS`, and everything stays open as it always
was. A plugin offers an authenticator (`register_authenticators`); from then on
a `/v1` request needs a credential one of them accepts, or the admin key, and
the principal says whose it is. Core uses the principal to stamp sessions with
their identity and team and to keep callers to their own sessions; a plugin
reads it with `current_principal()`.

A plugin may also refuse a chat request before its session exists: a *gate*
(`register_gates`) sees the request and the principal, raises an `APIError` to
refuse (a 429 with `Retry-After`, a 403), or returns an `Admission` with the
headers the response should carry and what to undo when the session never
starts after all.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from quart import g, has_request_context

#: The roles of a principal: the admin key sees everything, a team admin its
#: team's sessions and usage, a member its own; anonymous is the caller when no
#: plugin authenticates requests.
ROLES = ("admin", "team_admin", "member", "anonymous")


@attrs.frozen
class Principal:
    """The caller of a request, as an authenticator vouched for it."""

    identity: str = "anonymous"
    team: str | None = None
    #: "admin", "team_admin", "member" or "anonymous" (`ROLES`).
    role: str = attrs.field(default="member", validator=attrs.validators.in_(ROLES))
    #: The id of the credential (an API key's id), when there is one.
    key_id: str | None = None
    #: Whatever the authenticator wants to keep with the principal for its own
    #: gates (a key's limits, say). Core never reads it.
    details: Any = attrs.field(default=None, eq=False, repr=False)
    #: Which model names this caller may use, when not every one: `GET
    #: /v1/models` lists only those. (A gate still enforces it on requests.)
    may_use: Callable[[str], bool] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def authenticated(self) -> bool:
        return self.role != "anonymous"

    def sees(self, identity: str, team: str | None) -> bool:
        """Whether this caller may read, follow or stop a session (or usage) of
        `identity` in `team`. Anonymous callers see anonymous sessions, which is
        every session when no plugin authenticates requests."""
        if self.role == "admin":
            return True
        if identity == self.identity:
            return True
        return self.role == "team_admin" and self.team is not None and team == self.team


#: The caller when no plugin authenticates requests.
ANONYMOUS = Principal(role="anonymous")
#: The caller that presented the admin key (`STREAMVISOR_ADMIN_KEY`).
ADMIN = Principal(identity="admin", role="admin")


@attrs.frozen
class Admission:
    """What a gate that let a request through returns."""

    #: Headers for the response (rate-limit headers, say); they reach the client
    #: on success and on a later refusal by another gate alike.
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: Called (sync or async) when the session is not started after all: a later
    #: gate refused it, or the server could not open it. A session that starts
    #: ends with a terminal event, which is where a gate settles what it reserved.
    release: Callable[[], Any] | None = None


def current_principal() -> Principal:
    """The principal of the request being handled: what a route of a plugin
    calls. `ANONYMOUS` outside a request, or when nothing authenticates."""
    if not has_request_context():
        return ANONYMOUS
    return getattr(g, "principal", ANONYMOUS)
