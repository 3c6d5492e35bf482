"""Sessions on other servers (contract 1.3).

When several servers share the work (`serve --workers N`, or several machines
behind a load balancer), a request about a session may reach a server that does
not run it. A plugin that knows where every session runs (the built-in
`cluster` plugin, through Redis) offers a *session directory* with the
`register_session_directory` hook; the session routes ask it for any session
this server's memory does not hold, before they ask the store.

What the directory hands back is a `RemoteSession`: enough to read the session,
stop it, follow its chunks and read its output, whichever server runs it. Core
keeps its own rules around it: a caller who may not see the session gets the
same 404 as for a session that does not exist, and following sends the same
wire format, with the same `id:` values, as following on the owner.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

__all__ = ["RemoteSession", "SessionDirectory"]


@runtime_checkable
class RemoteSession(Protocol):
    """A session that runs, or ran, on another server."""

    id: str
    #: The `Runtime.instance_id` of the server that runs it.
    owner: str
    identity: str
    team: str | None
    model: str
    #: Wall-clock seconds since the epoch.
    created_at: float
    #: Whether its client asked for the usage chunk.
    include_usage: bool

    def to_json(self) -> dict[str, Any]:
        """The session object, as `GET /v1/sessions/{id}` on its owner gives it."""

    async def stop(self) -> tuple[bool, dict[str, Any]]:
        """Ask the owner to stop it, and wait for its answer: (whether the
        command reached the owner, the session object after it, with
        ``"stopped"`` saying whether this stop ended the stream)."""

    async def delete(self) -> bool:
        """Ask the owner to stop it and forget it (`DELETE /v1/sessions/{id}`);
        whether it had it."""

    async def completion(self) -> dict[str, Any]:
        """Its output so far as a ``chat.completion`` object, as
        `GET /v1/sessions/{id}/completion` on its owner gives it."""

    def follow(self, offset: int, keepalive: float) -> AsyncIterator[Any]:
        """Its chunks from `offset` on, as they come: ``(offset, [Delta, ...])``
        batches, None when nothing came for `keepalive` seconds, and last a
        `StoredSession` with its final state, usage and error (`interrupted`
        when its server died), or an `APIError` when the rest cannot be had."""


@runtime_checkable
class SessionDirectory(Protocol):
    async def find(self, session_id: str) -> RemoteSession | None:
        """The session when another server runs it, or ran it and still holds
        it; None when no other server has it (the store may). It may raise an
        `APIError` (a 503 when the directory cannot be asked)."""
