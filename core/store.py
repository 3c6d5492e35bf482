"""What the runtime asks of a session store, the one plugin that keeps sessions
past the process (the built-in `store` plugin, or a third party's).

A plugin offers a store with the `register_store` hook; a runtime has at most
one (`runtime.store`, None without). The session routes ask it for what memory
no longer holds: a session that left the registry, the chunks a finished
session's buffer let go, the sessions to list, a deletion. The usage plugin asks
it for the ledger, so that usage survives restarts.

Everything here is plain data: a store returns `StoredSession`s and `Delta`s, and
never hands out its connections.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import attrs

from . import sse
from .chat import Delta, Usage
from .errors import InvalidRequest
from .sessions import INTERRUPTED, LIVE_STATES, Session, session_object

__all__ = ["INTERRUPTED", "completion_id", "completion_object", "stored_of", "OutboxItem", "QueueStore", "QueuedItem", "RecordStore", "SessionQuery", "SessionStore", "StoredSession", "UsageRow", "decode_cursor", "encode_cursor"]


@attrs.frozen
class StoredSession:
    """A session as a store keeps it: its metadata, and what it knows of its
    transcript. `to_json()` is the same object `GET /v1/sessions/{id}` gives for
    a session in memory."""

    id: str
    request_id: str
    identity: str
    model: str
    provider: str
    #: pending, running (while live), completed, failed, stopped, disconnected,
    #: shutdown, or interrupted (its process died while it was live).
    state: str
    #: Wall-clock seconds since the epoch.
    created_at: float
    finish_reason: str | None = None
    usage: Usage | None = None
    #: The error a failed session ended with: {"message", "type", "code"}.
    error: dict[str, Any] | None = None
    #: Chunks the store holds (for a live session: written so far).
    chunks: int = 0
    timings: dict[str, float | None] = attrs.field(factory=dict)
    background: bool = False
    #: Whether the client asked for the usage chunk (`stream_options.include_usage`).
    include_usage: bool = False
    #: "kept", "not_stored" (store_content = false) or "purged" (retention).
    transcript: str = "kept"
    #: The caller's team, when its key belonged to one (contract 1.2).
    team: str | None = None
    #: The id of the API key the session was made with, or None (contract 1.2).
    key_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.state not in LIVE_STATES

    def to_json(self) -> dict[str, Any]:
        body = session_object(
            self.id,
            self.request_id,
            self.identity,
            self.model,
            self.provider,
            self.state,
            self.finish_reason,
            self.created_at,
            self.chunks,
            self.timings,
            self.usage,
            self.error,
            self.background,
            self.team,
            self.key_id,
        )
        body["transcript"] = self.transcript
        return body


def stored_of(session: Session) -> StoredSession:
    """A session in memory as a store would give it back: its metadata and end."""
    return StoredSession(
        id=session.id,
        request_id=session.request_id,
        identity=session.identity,
        model=session.request.model,
        provider=session.provider,
        state=session.state,
        created_at=session.created_at,
        finish_reason=session.finish_reason,
        usage=session.usage,
        error=None if session.error is None else session.error.summary(),
        chunks=session.chunk_count,
        timings=session.timings(),
        background=session.background,
        include_usage=session.request.include_usage,
        team=session.team,
        key_id=session.key_id,
    )


def completion_id(session_id: str) -> str:
    return f"chatcmpl-{session_id.removeprefix('sess_')}"


def completion_object(found: Session | StoredSession, deltas: list[Delta] | None = None) -> dict[str, Any]:
    """A session's output so far as a `chat.completion` object, with a
    `session` member (id, state, finished): what `GET
    /v1/sessions/{id}/completion` answers (public, contract 1.3). `deltas` are
    its chunks; by default a session's buffer, which must be whole."""
    if deltas is None:
        if not isinstance(found, Session) or found.dropped_chunks:
            raise ValueError("the session's buffer is not whole: pass its deltas")
        deltas = list(found.chunks)
    if isinstance(found, Session):
        model, created = found.request.model, int(found.created_at)
        usage = found.usage
        if usage is None:
            text = sum(len(d.content or "") + len(d.reasoning or "") for d in deltas)
            usage = Usage(found.request.estimate_prompt_tokens(), (text + 3) // 4, exact=False)
    else:
        model, created, usage = found.model, int(found.created_at), found.usage or Usage(exact=False)
    body = sse.completion(completion_id(found.id), model, created, deltas, found.finish_reason, usage)
    body["session"] = {"id": found.id, "state": found.state, "finished": found.finished}
    return body


@attrs.frozen
class SessionQuery:
    """What `GET /v1/sessions` selects; None means any. Times are wall-clock
    seconds, `since` inclusive and `until` exclusive, on the creation time.
    Results are newest first; `after` is the (created_at, id) of the last one
    seen, from the cursor."""

    state: str | None = None
    model: str | None = None
    identity: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 20
    after: tuple[float, str] | None = None
    #: Only the sessions of this team (a team admin's list; contract 1.2).
    team: str | None = None

    def selects(self, state: str, model: str, identity: str, created_at: float, session_id: str, team: str | None = None) -> bool:
        """Whether a session passes the filters and lies past the cursor."""
        if self.after is not None and (created_at, session_id) >= self.after:
            return False
        return (
            (self.state is None or state == self.state)
            and (self.model is None or model == self.model)
            and (self.identity is None or identity == self.identity)
            and (self.team is None or team == self.team)
            and (self.since is None or created_at >= self.since)
            and (self.until is None or created_at < self.until)
        )


def encode_cursor(created_at: float, session_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{session_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) of a cursor; a 400 naming `after` when it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, _, session_id = base64.urlsafe_b64decode(padded.encode("ascii")).decode().partition("|")
        if not session_id:
            raise ValueError
        return float(at), session_id
    except (ValueError, UnicodeError):
        raise InvalidRequest("'after' is not a cursor this server gave out", param="after") from None


@attrs.frozen
class UsageRow:
    """The usage of every finished session of one (model, provider, identity,
    outcome), summed by a store."""

    model: str
    provider: str
    identity: str
    outcome: str
    sessions: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    duration_ms: float
    #: Sessions whose counts were estimated.
    estimated: int
    #: What they cost in US dollars (sessions without a price count 0; contract 1.2).
    cost_usd: float = 0.0
    #: The API key they were made with, when a store groups by it (1.2); None
    #: for sessions without one, or a store that does not.
    key_id: str | None = None


@runtime_checkable
class SessionStore(Protocol):
    """The methods a store offers. Every one is async and may raise an
    `APIError` (a 503 when the database cannot answer)."""

    async def get(self, session_id: str) -> StoredSession | None:
        """The stored session, or None."""

    async def gone(self, session_id: str) -> str | None:
        """Why a session the store no longer has is gone ("deleted" or
        "purged"), or None when it never had it."""

    async def chunks(self, session_id: str, start: int, limit: int) -> list[Delta]:
        """The session's deltas from offset `start` on, at most `limit` of them
        (fewer, or none, when it holds no more yet)."""

    async def sessions(self, query: SessionQuery) -> list[StoredSession]:
        """The sessions the query selects, newest first, at most `query.limit`."""

    async def delete(self, session_id: str) -> bool:
        """Delete a session with its transcript and its usage record (a privacy
        request). Returns whether there was one."""

    async def usage(
        self, model: str | None, provider: str | None, identity: str | None, since: float | None, until: float | None, *, team: str | None = None
    ) -> list[UsageRow]:
        """The usage of the sessions that finished in [since, until), summed.
        The keyword `team` (contract 1.2) selects one team's sessions; a store
        written for 1.1 may lack it."""

    async def usage_records(
        self,
        model: str | None,
        provider: str | None,
        identity: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        *,
        team: str | None = None,
    ) -> list[dict[str, Any]]:
        """The individual usage records, newest first: the fields of the usage
        plugin's `UsageRecord.to_json()`. The keyword `team` as for `usage`."""


#: The methods `register_store` checks a store has: those of `SessionStore`.
STORE_METHODS = tuple(name for name, value in vars(SessionStore).items() if callable(value) and not name.startswith("_"))


@runtime_checkable
class RecordStore(Protocol):
    """What a store may offer besides sessions (contract 1.2): small JSON
    records and running amounts that other plugins keep in it (API keys and
    their spend, say), so that they outlive the process and are shared by every
    instance using the same database. A plugin that needs them checks
    ``isinstance(runtime.store, RecordStore)``.

    Records are grouped by `kind` (a plugin uses its own name as a prefix). A
    record may have one `lookup` value, unique within its kind, to be found by
    (a key's hash, say). Amounts are numbers per (kind, id, period), where
    `period` is any label the plugin chooses ("2026-12", "" for all time); adding
    to one is atomic. Every method is async and may raise an `APIError` (503)
    when the database cannot answer.
    """

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], lookup: str | None = None) -> None:
        """Create or replace a record. A `lookup` another record of the kind has
        raises `ValueError`."""

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """The record's data, or None."""

    async def find_record(self, kind: str, lookup: str) -> tuple[str, dict[str, Any]] | None:
        """The (id, data) of the record with this lookup value, or None."""

    async def list_records(self, kind: str, limit: int, after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Records of a kind by id, at most `limit`, those with ids after `after`."""

    async def add_amount(self, kind: str, amount_id: str, period: str, amount: float) -> float:
        """Add to an amount (created at 0) and return its new value."""

    async def amount(self, kind: str, amount_id: str, period: str) -> float:
        """An amount's value; 0 when nothing was added to it."""


#: The methods of a `RecordStore`.
RECORD_METHODS = tuple(name for name, value in vars(RecordStore).items() if callable(value) and not name.startswith("_"))


@attrs.frozen
class OutboxItem:
    """Work another plugin hands the store to keep until it is done (contract
    1.5): a webhook delivery, say. `id` is unique within its `queue`; putting an
    id that is already there does nothing, so a retried write never makes two."""

    queue: str
    id: str
    data: dict[str, Any]
    #: Wall-clock time before which it is not claimed (0: at once).
    due_at: float = 0.0


@attrs.frozen
class QueuedItem:
    """An outbox item as the store keeps it."""

    queue: str
    id: str
    data: dict[str, Any]
    #: pending (waiting, or leased to a worker), done, or dead (given up on).
    state: str
    due_at: float
    created_at: float
    updated_at: float
    #: The worker holding it, and until when (wall clock), while leased.
    lease_owner: str | None = None
    lease_until: float | None = None


#: What a plugin hands `QueueStore.on_session_end`: called with a session that
#: has just reached its final state and when it did (wall clock); returns the
#: items to write with that state.
SessionEndHook = Callable[[StoredSession, float], Iterable[OutboxItem]]


@runtime_checkable
class QueueStore(Protocol):
    """A durable outbox a store may offer (contract 1.5): items written in the
    same transaction as a session's final state, so a crash never loses one or
    makes one up, and leased to one worker at a time, so that among several
    instances sharing the database each item is handled by one. A plugin that
    needs it checks ``isinstance(runtime.store, QueueStore)``.

    The plugin's worker `claim`s what is due (a lease of `lease_seconds`), does
    the work, and `settle`s each item: done, dead, or pending again at a later
    `due_at`. An item whose worker died is claimed again when its lease ends.
    """

    def on_session_end(self, hook: SessionEndHook) -> None:
        """Call `hook(session, at)` whenever a session's final state is written
        (its end, or `interrupted` after its server died) and write what it
        returns in the same transaction. The hook may run in a worker thread;
        it must be quick and do no I/O. Register hooks at start-up."""

    async def enqueue(self, items: Iterable[OutboxItem]) -> None:
        """Write items outside any session (ids already there are left alone)."""

    async def claim(self, queue: str, owner: str, limit: int, lease_seconds: float) -> list[QueuedItem]:
        """Lease up to `limit` pending items of `queue` that are due and not
        leased (or whose lease ended) to `owner`, oldest due first."""

    async def settle(self, queue: str, item_id: str, owner: str, state: str, data: dict[str, Any], due_at: float | None = None) -> bool:
        """End `owner`'s lease of an item: `state` "done", "dead", or "pending"
        (again at `due_at`), with new `data`. False when the lease is no longer
        the owner's (it ran out and another worker claimed the item)."""

    async def settle_many(self, queue: str, owner: str, settlements: list[tuple[str, str, dict[str, Any], float | None]]) -> list[bool]:
        """Several `settle`s of one queue, `(item_id, state, data, due_at)`
        each, in one transaction: a worker that finishes many items a second
        pays one write for them. Returns each one's answer."""

    async def requeue(self, queue: str, item_id: str, due_at: float) -> bool:
        """Make an item pending again at `due_at`, whatever its state (a retry
        by hand). False when it is leased right now, or there is no such item."""

    async def queue_item(self, queue: str, item_id: str) -> QueuedItem | None:
        """One item, or None."""

    async def queue_items(self, queue: str, limit: int, before: tuple[float, str] | None = None, state: str | None = None) -> list[QueuedItem]:
        """The items of a queue, newest first (by creation time, then id): at
        most `limit`, those created before `before` = (created_at, id)."""


#: The methods of a `QueueStore`.
QUEUE_METHODS = tuple(name for name, value in vars(QueueStore).items() if callable(value) and not name.startswith("_"))
