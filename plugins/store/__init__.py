"""The `store` plugin: sessions, transcripts and usage that survive restarts.

SQLite by default (`url = "sqlite:///data/streamvisor.db"`, relative to
plugins.toml), PostgreSQL with `url = "postgresql://..."`. The database is only
ever called from worker threads; the trio loop never waits on it.

How a session gets written:

- When a session starts, its chunk-transformer factory (called by the runtime,
  synchronously) *holds* the session's buffer (`Session.hold()`) and tracks it.
  It transforms nothing.
- The `writer` service wakes every `min(50 ms, flush_interval)` and writes, in
  one transaction, every tracked session that is due: one with `flush_chunks`
  chunks pending, or whose last write (or start) is `flush_interval_ms` less
  two ticks old. So a `kill -9` loses at most about `flush_interval_ms`.
- The session's terminal event (never dropped) gives its outcome; the next
  write records the last chunks, the final row and the usage record in one
  transaction, then lets go of the buffer.

Nothing here slows a stream: the buffer is the queue, and the runtime's buffer
meter bounds it. When the database fails, the batch is retried with backoff for
`write_retry_seconds`; past that its sessions' unwritten parts are counted as
lost (the status panel, the metrics and readiness say so) and their buffers let
go. Sessions past `max_pending_sessions` are not tracked, and counted.

At start-up the schema is migrated, and sessions this server (host and port)
left live when it died are marked `interrupted`, with estimated usage.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import attrs
import orjson
import trio
from prometheus_client import Counter, Gauge, Histogram

from streamvisor.hooks import (
    TERMINAL_TYPES,
    APIError,
    ChatRequest,
    ConfigError,
    Delta,
    Event,
    Health,
    OutboxItem,
    QueuedItem,
    Session,
    SessionQuery,
    StoredSession,
    UsageRow,
    hookimpl,
    listens_to,
    stored_of,
    positive,
)

from . import queries
from .db import Conflict, Database, StoreUnavailable, Target, parse_url

log = logging.getLogger("streamvisor.store")

#: Sessions ended and not yet written that wake the writer before its tick.
ENDED_WAKE = 256
#: How often the writer looks for what is due (at most).
TICK_SECONDS = 0.05

__all__ = ["StorePlugin", "Settings", "Retention", "Store"]


@attrs.frozen
class Retention:
    """Days each kind of record is kept after its session finished (0: for ever)."""

    #: Chunks and request messages.
    transcripts: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    #: The session rows (state, timings, usage); a purged session answers 410.
    metadata: float = attrs.field(default=90.0, validator=attrs.validators.ge(0))
    #: The usage ledger.
    usage: float = attrs.field(default=400.0, validator=attrs.validators.ge(0))
    #: Outbox items that are done or were given up on (webhook deliveries);
    #: pending ones are never purged.
    outbox: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))


@attrs.frozen
class Settings:
    #: sqlite:///relative/to/plugins.toml.db, sqlite:////absolute.db or postgresql://...
    url: str = "sqlite:///data/streamvisor.db"
    #: False keeps metadata and usage only: no messages, no output.
    store_content: bool = True
    #: A session's chunks are written at least this often while it streams ...
    flush_interval_ms: int = attrs.field(default=250, validator=positive)
    #: ... or as soon as this many are pending, whichever comes first.
    flush_chunks: int = attrs.field(default=64, validator=positive)
    #: Sessions with unwritten parts tracked at most; past it new sessions are
    #: not stored (and counted).
    max_pending_sessions: int = attrs.field(default=50_000, validator=positive)
    #: How long a failing write is retried before its data is counted as lost.
    write_retry_seconds: float = attrs.field(default=60.0, validator=positive)
    #: PostgreSQL connections at most.
    pool_size: int = attrs.field(default=4, validator=positive)
    #: Connecting, and waiting for a connection, takes at most this long.
    connect_timeout: float = attrs.field(default=5.0, validator=positive)
    #: A statement that runs longer is cancelled (PostgreSQL).
    statement_timeout: float = attrs.field(default=10.0, validator=positive)
    retention_days: Retention = attrs.field(factory=Retention)
    #: How often the purge service enforces retention_days.
    purge_interval_seconds: float = attrs.field(default=3600.0, validator=positive)
    #: How long a deleted or purged session answers 410 (then 404).
    tombstone_days: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))


@attrs.define(eq=False)
class _Tracked:
    session: Session
    #: Chunks encoded into `encoded` or written, and the characters of their text.
    collected: int = 0
    output_chars: int = 0
    #: Chunk rows encoded and not yet written (kept until a write succeeds).
    encoded: list[tuple[Any, ...]] = attrs.Factory(list)
    #: Chunks written.
    written: int = 0
    row_written: bool = False
    #: monotonic time of the last collection of its chunks.
    last: float = 0.0
    #: Its terminal event, once it came: the final write.
    ended: Event | None = None
    held: bool = False
    #: Its outbox rows (contract 1.5), made once when it ended.
    outbox: list[tuple[Any, ...]] = attrs.Factory(list)


@attrs.define(eq=False)
class _Batch:
    """Rows for one transaction, and the tracked sessions they write."""

    sessions: list[tuple[Any, ...]] = attrs.Factory(list)
    chunks: list[tuple[Any, ...]] = attrs.Factory(list)
    records: list[tuple[Any, ...]] = attrs.Factory(list)
    outbox: list[tuple[Any, ...]] = attrs.Factory(list)
    #: (tracked, chunks collected, chunk rows included, whether its final row is in)
    advances: list[tuple[_Tracked, int, int, bool]] = attrs.Factory(list)


class _Failing:
    """A write that keeps failing: since when, why, and how many tries."""

    def __init__(self, now: float, error: str) -> None:
        self.since = now
        self.error = error
        self.tries = 0


class Store:
    """The session store the runtime and the usage plugin read (`SessionStore`),
    and other plugins' records and amounts (`RecordStore`)."""

    def __init__(self, plugin: "StorePlugin") -> None:
        self._plugin = plugin

    async def _run(self, fn: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        """Run `fn(conn, *args)` in a worker thread, in a short transaction of
        its own (a `write` one takes SQLite's write lock at once)."""
        db = self._plugin.db
        if db is None:
            raise _unavailable("the store is not open")

        def run() -> Any:
            with db.connection(write=write) as conn:
                return fn(conn, *args)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._plugin.readers)
        except Conflict:
            raise ValueError("another record of this kind has this lookup") from None
        except StoreUnavailable as exc:
            raise _unavailable(str(exc)) from None

    async def get(self, session_id: str) -> StoredSession | None:
        return await self._run(queries.get, session_id)

    async def gone(self, session_id: str) -> str | None:
        return await self._run(queries.gone, session_id)

    async def request_of(self, session_id: str) -> dict[str, Any] | None:
        """What a session was asked (contract 1.5, optional): `{"messages",
        "parameters", "extra"}`, or None when it is not kept
        (`store_content = false`, or purged with the transcript)."""
        return await self._run(queries.request_of, session_id)

    async def chunks(self, session_id: str, start: int, limit: int) -> list[Delta]:
        return await self._run(queries.chunks, session_id, start, limit)

    async def sessions(self, query: SessionQuery) -> list[StoredSession]:
        return await self._run(queries.sessions, query)

    async def delete(self, session_id: str) -> bool:
        return await self._plugin.delete(session_id)

    async def interrupt(self, owner: str) -> list[str]:
        """Mark the live sessions of server `owner` (a `Runtime.instance_id`
        that died) `interrupted`, with their output so far and their usage
        recorded once (contract 1.3: what the cluster plugin calls when a
        server stops beating). Returns their ids; a second call finds none."""
        plugin = self._plugin

        def recover(conn: Any) -> list[str]:
            return queries.recover(conn, owner, outbox=plugin.outbox_rows if plugin.end_hooks else None)

        return await self._run(recover, write=True)

    # -- QueueStore (contract 1.5) ----------------------------------------------------------

    def on_session_end(self, hook: Callable[[StoredSession, float], Iterable[OutboxItem]]) -> None:
        if not callable(hook):
            raise TypeError("on_session_end takes a function of (session, at)")
        self._plugin.end_hooks.append(hook)

    async def enqueue(self, items: Iterable[OutboxItem]) -> None:
        rows = _outbox_rows(items, time.time())
        if rows:
            await self._run(queries.enqueue, rows, write=True)

    async def claim(self, queue: str, owner: str, limit: int, lease_seconds: float) -> list[QueuedItem]:
        if limit < 1:
            return []
        now = time.time()
        return await self._run(queries.claim, queue, owner, limit, now, now + lease_seconds, write=True)

    async def settle(self, queue: str, item_id: str, owner: str, state: str, data: dict[str, Any], due_at: float | None = None) -> bool:
        (kept,) = await self.settle_many(queue, owner, [(item_id, state, data, due_at)])
        return kept

    async def settle_many(self, queue: str, owner: str, settlements: list[tuple[str, str, dict[str, Any], float | None]]) -> list[bool]:
        for _, state, _, _ in settlements:
            if state not in ("pending", "done", "dead"):
                raise ValueError(f"an outbox item is settled pending, done or dead, not {state!r}")
        if not settlements:
            return []
        rows = [(item_id, state, orjson.dumps(data).decode(), due_at) for item_id, state, data, due_at in settlements]
        return await self._run(queries.settle_many, queue, owner, rows, time.time(), write=True)

    async def requeue(self, queue: str, item_id: str, due_at: float) -> bool:
        return await self._run(queries.requeue, queue, item_id, due_at, time.time(), write=True)

    async def queue_item(self, queue: str, item_id: str) -> QueuedItem | None:
        return await self._run(queries.queue_item, queue, item_id)

    async def queue_items(self, queue: str, limit: int, before: tuple[float, str] | None = None, state: str | None = None) -> list[QueuedItem]:
        if limit < 1:
            return []
        return await self._run(queries.queue_items, queue, limit, before, state)

    async def usage(
        self,
        model: str | None,
        provider: str | None,
        identity: str | None,
        since: float | None,
        until: float | None,
        *,
        team: str | None = None,
    ) -> list[UsageRow]:
        return await self._run(queries.usage, model, provider, identity, since, until, team)

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
        return await self._run(queries.usage_records, model, provider, identity, since, until, limit, team)

    async def usage_series(
        self, since: float, until: float, bucket_seconds: float, by: str, *, identity: str | None = None, team: str | None = None
    ) -> list[dict[str, Any]]:
        """The usage ledger over time (contract 1.5, optional): sessions that
        finished in [since, until), summed per bucket of `bucket_seconds` and per
        `by` (model, key_id, outcome, identity or provider). Each row: `at` (the
        bucket's start), `group`, `sessions`, `prompt_tokens`,
        `completion_tokens`, `reasoning_tokens`, `cost_usd`. Buckets without
        sessions are left out."""
        if not (bucket_seconds > 0 and until > since):
            raise ValueError("usage_series needs since < until and a bucket of more than 0 seconds")
        return await self._run(queries.usage_series, since, until, bucket_seconds, by, identity, team)

    # -- RecordStore (contract 1.2) -------------------------------------------------------

    async def put_record(self, kind: str, record_id: str, data: dict[str, Any], lookup: str | None = None) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"a record's data is a dict, not {type(data).__name__}")
        encoded = orjson.dumps(data).decode()  # here: a TypeError for what JSON cannot hold
        await self._run(queries.put_record, kind, record_id, encoded, lookup, time.time(), write=True)

    async def put_records(self, kind: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Create or replace several records of a kind, without lookups, in one
        transaction (contract 1.4): for a plugin that keeps a record per
        request and writes them in batches."""
        if not items:
            return
        rows = [(record_id, orjson.dumps(data).decode()) for record_id, data in items]
        await self._run(queries.put_records, kind, rows, time.time(), write=True)

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        return await self._run(queries.get_record, kind, record_id)

    async def find_record(self, kind: str, lookup: str) -> tuple[str, dict[str, Any]] | None:
        return await self._run(queries.find_record, kind, lookup)

    async def delete_record(self, kind: str, record_id: str) -> bool:
        """Delete a record (contract 1.5); whether there was one. Of two
        callers deleting the same record, one gets True."""
        return await self._run(queries.delete_record, kind, record_id, write=True)

    async def list_records(self, kind: str, limit: int, after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        if limit < 1:
            return []
        return await self._run(queries.list_records, kind, limit, after)

    async def add_amount(self, kind: str, amount_id: str, period: str, amount: float) -> float:
        if not math.isfinite(amount):
            raise ValueError(f"an amount is a finite number, not {amount!r}")
        return await self._run(queries.add_amount, kind, amount_id, period, float(amount), write=True)

    async def amount(self, kind: str, amount_id: str, period: str) -> float:
        return await self._run(queries.amount, kind, amount_id, period)


def _outbox_rows(items: Iterable[OutboxItem], now: float) -> list[tuple[Any, ...]]:
    """Outbox items as rows (`queries.OUTBOX_COLUMNS`); a TypeError for what
    JSON cannot hold, here and not in the worker thread."""
    rows = []
    for item in items:
        if not isinstance(item, OutboxItem):
            raise TypeError(f"an outbox item is an OutboxItem, not {type(item).__name__}")
        rows.append((item.queue, item.id, "pending", item.due_at or now, orjson.dumps(item.data).decode(), now, now))
    return rows


def _unavailable(reason: str) -> APIError:
    return APIError(f"The session store cannot answer: {reason}", status=503, type="server_error", code="store_unavailable", headers={"Retry-After": "1"})


@attrs.frozen
class _Metrics:
    writes: Counter
    lost: Counter
    pending: Gauge
    write_seconds: Histogram


class StorePlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(self)
        self.db: Database | None = None
        self.target: Target | None = None
        self.owner = ""
        self.owner_name = ""
        self.schema_version = 0
        self.recovered = 0
        self.readers = trio.CapacityLimiter(max(2, settings.pool_size))
        #: Writes (the writer's batches, deletions, purges) go one at a time.
        self._write_lock = trio.Lock()
        self._tracked: dict[str, _Tracked] = {}
        #: Ids deleted on request recently: nothing more is written for them.
        self._deleted: dict[str, None] = {}
        self._wake = trio.Event()
        #: Set when start-up has opened the database (services start before it).
        self._opened = trio.Event()
        #: Sessions that ended since the last write.
        self._ended = 0
        self._failing: _Failing | None = None
        self.written_batches = 0
        self.lost_sessions = 0
        self.lost_chunks = 0
        self.untracked = 0
        self.last_write: float | None = None
        self.purged: dict[str, int] = {"transcripts": 0, "metadata": 0, "usage": 0, "outbox": 0, "tombstones": 0}
        interval = settings.flush_interval_ms / 1000
        #: The writer's clock.
        self._tick = min(TICK_SECONDS, interval)
        #: A session's chunks are collected this long after its last collection.
        #: The writer looks every tick, and the write itself takes time: two
        #: ticks less than the interval keep "at most flush_interval_ms from a
        #: chunk's arrival to the database" true, not only on average.
        self._interval = max(self._tick, interval - 2 * self._tick)
        self._transcript = "kept" if settings.store_content else "not_stored"
        #: Other plugins' on_session_end hooks (contract 1.5).
        self.end_hooks: list[Callable[[StoredSession, float], Iterable[OutboxItem]]] = []
        self.outbox_faults = 0

    # -- hooks ------------------------------------------------------------------------------

    @hookimpl
    def register_store(self, register: Any, runtime: Any) -> None:
        try:
            self.target = parse_url(self.settings.url, runtime.config.source)
        except ValueError as exc:
            raise ConfigError(runtime.config.source, "plugins.store.url", "sqlite:///PATH or postgresql://...", str(exc)) from None
        # Sessions are written as this process's; start-up recovers those of the
        # earlier runs of this server (its name: host and port, and the worker).
        self.owner = runtime.instance_id
        self.owner_name = runtime.instance
        registry = runtime.metrics
        self.metrics = _Metrics(
            writes=Counter("streamvisor_store_writes", "Store write batches, by result.", ["result"], registry=registry),
            lost=Counter("streamvisor_store_lost", "What the store could not write after retrying, or did not track.", ["kind"], registry=registry),
            pending=Gauge("streamvisor_store_pending_sessions", "Sessions with parts not yet written.", registry=registry),
            write_seconds=Histogram(
                "streamvisor_store_write_seconds", "Time of one store write batch.", registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ),
        )
        self.metrics.pending.set_function(lambda: len(self._tracked))
        register(self.store)

    @hookimpl
    async def startup(self, runtime: Any) -> None:
        assert self.target is not None
        db = Database(
            self.target, pool_size=self.settings.pool_size, timeout=self.settings.connect_timeout, statement_timeout=self.settings.statement_timeout
        )

        def prepare() -> tuple[list[int], list[str], int]:
            db.open()
            applied = db.migrate()
            with db.connection() as conn:
                recovered = queries.recover(conn, self.owner_name, every_run=True, outbox=self.outbox_rows if self.end_hooks else None)
            return applied, recovered, db.status()["current"]

        try:
            applied, recovered, version = await trio.to_thread.run_sync(prepare)
        except StoreUnavailable as exc:
            db.close()
            raise ConfigError(runtime.config.source, "plugins.store.url", "a database the store can open", f"{self.target.shown}: {exc}") from None
        self.db = db
        self._opened.set()
        self.schema_version = version
        self.recovered = len(recovered)
        if applied:
            log.info("store: migrated %s to schema version %d", self.target.shown, version)
        if recovered:
            log.warning("store: %d sessions were live when this server last stopped; they are marked interrupted", len(recovered))
        log.info("store: %s (schema %d)", self.target.shown, version)

    @hookimpl
    async def shutdown(self) -> None:
        # The terminal events were delivered before this hook: write what is left.
        db = self.db
        if db is None:
            return
        for _ in range(3):
            if not self._tracked:
                break
            if not await self.flush(force=True):
                break
        if self._tracked:
            # The database failed to the end: say what it did not get.
            sessions = len(self._tracked)
            chunks = sum(len(t.session.chunks) - t.written if t.held else t.collected - t.written for t in self._tracked.values())
            self.lost_sessions += sessions
            self.lost_chunks += max(0, chunks)
            log.error("store: stopping with %d sessions (%d chunks) not written: the database did not take them", sessions, chunks)
        # The writer service runs until it is cancelled, after this hook: it
        # finds no database and writes nothing more.
        async with self._write_lock:
            self.db = None
        db.close()

    @hookimpl
    def register_chunk_transformers(self, register: Any) -> None:
        register(self.track)

    @hookimpl
    @listens_to(*TERMINAL_TYPES)
    def on_event(self, event: Event) -> None:
        self.finished(event)

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("writer", self.run_writer)
        register("purge", self.run_purge)

    @hookimpl
    def register_health_checks(self, register: Any) -> None:
        register("database", self.check)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("status", self.status)

    def outbox_rows(self, session: StoredSession, at: float) -> list[tuple[Any, ...]]:
        """The outbox rows the on_session_end hooks give for a session that
        ended. A hook that raises is logged and gives nothing: the session's
        own write must not fail for it."""
        rows: list[tuple[Any, ...]] = []
        for hook in self.end_hooks:
            try:
                rows += _outbox_rows(hook(session, at), time.time())
            except Exception:
                self.outbox_faults += 1
                log.exception("store: an on_session_end hook failed for session %s", session.id)
        return rows

    # -- tracking -----------------------------------------------------------------------------

    def track(self, session: Session) -> None:
        """The chunk-transformer factory: hold and track the session; no transform."""
        if session.id in self._tracked or session.id in self._deleted:
            return None
        if len(self._tracked) >= self.settings.max_pending_sessions:
            self.untracked += 1
            self.metrics.lost.labels("untracked_session").inc()
            if self.untracked in (1, 10, 100) or self.untracked % 1000 == 0:
                log.warning("store: %d sessions not stored: %d sessions wait to be written (max_pending_sessions)", self.untracked, len(self._tracked))
            return None
        keep = self.settings.store_content
        if keep:
            session.hold()
        self._tracked[session.id] = _Tracked(session, last=time.monotonic(), held=keep)
        return None

    def finished(self, event: Event) -> None:
        tracked = self._tracked.get(event.session_id)
        if tracked is None:
            return  # not stored (untracked or deleted)
        tracked.ended = event
        if self.end_hooks:
            tracked.outbox = self.outbox_rows(stored_of(tracked.session), event.at)
        # Its last chunks are encoded now and its buffer let go: held until the
        # next write, a finished session's deltas would outlive the young
        # garbage collections and cost the full ones (measured: ~30 µs a session).
        self._encode(tracked)
        self._release(tracked)
        # No write per session: the writer's next tick (at most 50 ms away)
        # takes every session that ended meanwhile in one transaction. Only a
        # pile of ended sessions wakes it early.
        self._ended += 1
        if self._ended >= ENDED_WAKE:
            self._wake.set()

    def _encode(self, tracked: _Tracked) -> None:
        """Encode the session's chunks not yet collected into a chunk row."""
        session = tracked.session
        chunks = session.chunks
        start = tracked.collected
        # A buffer that is not held (store_content = false) may be gone already.
        end = len(chunks) if (tracked.held or not session.dropped_chunks) else start
        if end <= start:
            return
        deltas = chunks[start:end]
        chars = tracked.output_chars
        for delta in deltas:
            if delta.content:
                chars += len(delta.content)
            if delta.reasoning:
                chars += len(delta.reasoning)
        if self.settings.store_content:
            tracked.encoded.append((session.id, start, end - start, queries.encode_deltas(deltas)))
        tracked.collected, tracked.output_chars = end, chars

    def _request_json(self, request: ChatRequest) -> str | None:
        if not self.settings.store_content:
            return None
        params = {
            name: getattr(request, name)
            for name in ("stream", "max_tokens", "temperature", "top_p", "seed", "user", "background")
            if getattr(request, name) not in (None, False)
        }
        if request.stop:
            params["stop"] = list(request.stop)
        return orjson.dumps({"messages": list(request.messages), "parameters": params, "extra": request.extra}, default=str).decode()

    def _row(self, tracked: _Tracked, chunk_count: int, chars: int, wall: float) -> tuple[Any, ...]:
        """The session as it stands now (`queries.ROW_COLUMNS`), for an upsert.
        Its final state comes only with its terminal event, so that the row's
        end and the usage record are written in one transaction."""
        session = tracked.session
        request = session.request
        ended = tracked.ended
        started, first_token = session.started_mono, session.first_token_mono
        created = session.created_mono
        new = not tracked.row_written
        if ended is None:
            state, updated, finished, duration, finish_reason, error = "running", wall, None, None, None, None
            usage = session.usage
        else:
            outcome = ended.outcome
            assert outcome is not None
            state, updated, finished, duration = session.state, ended.at, ended.at, outcome.duration_ms
            finish_reason, usage, chunk_count = session.finish_reason, outcome.usage, session.chunk_count
            failure = session.error
            error = None if failure is None else orjson.dumps(failure.summary()).decode()
        return (
            session.id, session.request_id, session.identity, session.model, session.provider, state, self.owner,
            int(session.background), int(request.include_usage), session.created_at, updated, finished,
            None if started is None else round((started - created) * 1000, 3),
            None if first_token is None else round((first_token - created) * 1000, 3),
            duration, finish_reason, error, chunk_count, chars,
            request.estimate_prompt_tokens() if new else 0,
            None if usage is None else usage.prompt_tokens,
            None if usage is None else usage.completion_tokens,
            None if usage is None else usage.reasoning_tokens,
            None if usage is None else int(usage.exact),
            self._transcript,
            self._request_json(request) if new else None,
            session.team,
            None if usage is None else usage.cost_usd,
            None if usage is None else usage.cached_tokens,
            session.key_id,
        )

    @staticmethod
    def _record(event: Event) -> tuple[Any, ...]:
        """A terminal event as a usage record (`queries.USAGE_COLUMNS`)."""
        outcome = event.outcome
        assert outcome is not None
        usage = outcome.usage
        return (
            event.session_id, event.request_id, event.model, event.provider, event.identity, event.type, event.at,
            usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens, outcome.duration_ms, outcome.first_token_ms, int(usage.exact),
            event.team, usage.cost_usd, usage.cached_tokens, event.key_id,
        )

    # -- writing ------------------------------------------------------------------------------

    def _collect(self, now: float, force: bool) -> _Batch:
        """What is due now, as rows (made here, on the trio thread, so that the
        worker thread only runs the database)."""
        batch = _Batch()
        interval, threshold = self._interval, self.settings.flush_chunks
        wall = time.time()
        for tracked in self._tracked.values():
            session = tracked.session
            if tracked.ended is None:
                pending = len(session.chunks) - tracked.collected
                # A new session waits for its interval too: a stream shorter
                # than that is written once, whole, at its end; one cut by a
                # kill -9 in its first interval loses that interval, as any.
                due = (
                    force
                    or pending >= threshold
                    or (now - tracked.last >= interval and (pending > 0 or not tracked.row_written))
                    or tracked.encoded
                )
                if not due:
                    continue
                self._encode(tracked)
                tracked.last = now
            batch.chunks.extend(tracked.encoded)
            batch.sessions.append(self._row(tracked, tracked.collected, tracked.output_chars, wall))
            if tracked.ended is not None:
                batch.records.append(self._record(tracked.ended))
                batch.outbox.extend(tracked.outbox)
            # What this batch writes of it: its terminal event may come, and
            # more chunks be encoded, while the batch is being written.
            batch.advances.append((tracked, tracked.collected, len(tracked.encoded), tracked.ended is not None))
        return batch

    async def flush(self, force: bool = False) -> bool:
        """Write what is due (everything, with `force`). Returns False when the
        write failed (it is retried later, from the same point).

        One flush at a time, from collecting to advancing: two flushes that
        collected overlapping chunk ranges would write the shorter one and
        skip the rest (a batch is keyed by its first offset)."""
        db = self.db
        if db is None or not self._tracked:
            return True

        async with self._write_lock:
            now = time.monotonic()
            batch = self._collect(now, force)
            if not batch.advances:
                return True

            def write() -> None:
                with db.connection() as conn:
                    queries.write(conn, batch.sessions, batch.chunks, batch.records, batch.outbox)

            t0 = time.perf_counter()
            try:
                await trio.to_thread.run_sync(write)
            except StoreUnavailable as exc:
                self.metrics.writes.labels("failed").inc()
                self._failed(str(exc), batch.advances, now)
                return False
            self.metrics.write_seconds.observe(time.perf_counter() - t0)
            self.metrics.writes.labels("ok").inc()
            if self._failing is not None:
                log.warning("store: writes succeed again after %.1f s of failures", now - self._failing.since)
                self._failing = None
            self.written_batches += 1
            self.last_write = time.time()
            self._ended = 0
            for tracked, collected, rows, final in batch.advances:
                tracked.written, tracked.row_written = collected, True
                del tracked.encoded[:rows]
                if final:
                    self._forget(tracked)
        return True

    def _failed(self, error: str, advances: list[tuple[_Tracked, int, int, bool]], now: float) -> None:
        failing = self._failing
        if failing is None:
            failing = self._failing = _Failing(now, error)
            log.error("store: a write failed (%s); retrying for up to %g s", error, self.settings.write_retry_seconds)
        failing.error = error
        failing.tries += 1
        if now - failing.since < self.settings.write_retry_seconds:
            return
        # Given up on: count what these sessions could not get written, and let
        # their buffers go (the stream never waited for them).
        for tracked, collected, rows, final in advances:
            unwritten = collected - tracked.written
            if final or not tracked.row_written:
                self.lost_sessions += 1
                self.metrics.lost.labels("session").inc()
            self.lost_chunks += unwritten
            self.metrics.lost.labels("chunks").inc(unwritten)
            tracked.written = collected
            del tracked.encoded[:rows]
            if final:
                self._forget(tracked)
        log.error("store: gave up on a write after %.0f s (%s); %d sessions and %d chunks lost so far", now - failing.since, error, self.lost_sessions, self.lost_chunks)

    def _forget(self, tracked: _Tracked) -> None:
        self._tracked.pop(tracked.session.id, None)
        self._release(tracked)

    @staticmethod
    def _release(tracked: _Tracked) -> None:
        if tracked.held:
            tracked.held = False
            tracked.session.unhold()

    async def run_writer(self) -> None:
        """The service actor: write what is due, at least every `flush_interval_ms`."""
        tick = self._tick
        backoff = tick
        while True:
            if self._failing is None:
                with trio.move_on_after(tick):
                    await self._wake.wait()
            else:
                # Failing: retry on the backoff's clock, not on every session's end.
                await trio.sleep(backoff)
            self._wake = trio.Event()
            if await self.flush():
                backoff = tick
            else:
                backoff = min(2.0, backoff * 2)

    # -- deletion and retention -----------------------------------------------------------

    async def delete(self, session_id: str) -> bool:
        db = self.db
        if db is None:
            raise _unavailable("the store is not open")
        known = session_id in self._tracked

        def run() -> bool:
            with db.connection() as conn:
                return queries.delete(conn, session_id, time.time(), known)

        async with self._write_lock:
            # Under the lock: no batch of this session is being written, and
            # none will be.
            self._deleted[session_id] = None
            while len(self._deleted) > 10_000:
                del self._deleted[next(iter(self._deleted))]
            tracked = self._tracked.get(session_id)
            if tracked is not None:
                self._forget(tracked)
            try:
                return await trio.to_thread.run_sync(run)
            except StoreUnavailable as exc:
                raise _unavailable(str(exc)) from None

    async def purge(self, now: float | None = None) -> dict[str, int]:
        """Enforce retention_days once (in small batches). Returns what went."""
        db = self.db
        if db is None:
            return {}
        now = time.time() if now is None else now
        days = self.settings.retention_days
        steps: list[tuple[str, Callable[[Any], int]]] = []
        if days.transcripts:
            steps.append(("transcripts", lambda conn: queries.purge_transcripts(conn, now - days.transcripts * 86400)))
        if days.metadata:
            steps.append(("metadata", lambda conn: queries.purge_metadata(conn, now - days.metadata * 86400, now)))
        if days.usage:
            steps.append(("usage", lambda conn: queries.purge_usage(conn, now - days.usage * 86400)))
        if days.outbox:
            steps.append(("outbox", lambda conn: queries.purge_outbox(conn, now - days.outbox * 86400)))
        if self.settings.tombstone_days:
            steps.append(("tombstones", lambda conn: queries.purge_tombstones(conn, now - self.settings.tombstone_days * 86400)))
        done: dict[str, int] = {}
        for name, step in steps:
            total = 0
            while True:

                def run() -> int:
                    with db.connection() as conn:
                        return step(conn)

                async with self._write_lock:
                    count = await trio.to_thread.run_sync(run)
                total += count
                if count < queries.PURGE_BATCH:
                    break
            done[name] = total
            self.purged[name] += total
        if any(done.values()):
            log.info("store: purged %s", ", ".join(f"{n} {k}" for k, n in done.items() if n))
        return done

    async def run_purge(self) -> None:
        """The service actor: enforce retention once the database is open, then
        every purge_interval_seconds."""
        await self._opened.wait()
        while True:
            try:
                await self.purge()
            except StoreUnavailable as exc:
                log.warning("store: the purge failed (%s); it runs again in %g s", exc, self.settings.purge_interval_seconds)
            await trio.sleep(self.settings.purge_interval_seconds)

    # -- readiness and status -------------------------------------------------------------

    async def check(self) -> Health:
        db = self.db
        if db is None:
            return Health(False, "the store is not open")
        failing = self._failing
        if failing is not None:
            return Health(
                False,
                f"writes failing for {time.monotonic() - failing.since:.1f} s ({failing.error}); "
                f"{len(self._tracked)} sessions wait, {self.lost_sessions} sessions lost",
            )
        try:
            await trio.to_thread.run_sync(db.ping, limiter=self.readers)
        except StoreUnavailable as exc:
            return Health(False, str(exc))
        lost = f"; {self.lost_sessions} sessions and {self.lost_chunks} chunks could not be written" if self.lost_sessions or self.lost_chunks else ""
        return Health(True, f"{self.target.dialect if self.target else ''}, {len(self._tracked)} sessions pending{lost}")

    def status(self) -> dict[str, Any]:
        failing = self._failing
        return {
            "url": self.target.shown if self.target else None,
            "schema_version": self.schema_version,
            "store_content": self.settings.store_content,
            "pending_sessions": len(self._tracked),
            "written_batches": self.written_batches,
            "last_write": self.last_write,
            "failing": None if failing is None else {"since_seconds": round(time.monotonic() - failing.since, 3), "error": failing.error, "tries": failing.tries},
            "lost_sessions": self.lost_sessions,
            "lost_chunks": self.lost_chunks,
            "untracked_sessions": self.untracked,
            "recovered_at_start": self.recovered,
            "purged": dict(self.purged),
        }

    # -- streamvisor db ---------------------------------------------------------------------

    def db_command(self, action: str, config_source: str) -> dict[str, Any]:
        """`streamvisor db status|upgrade`: the schema's state, after upgrading it
        for "upgrade". Synchronous: the CLI runs it outside any server."""
        target = parse_url(self.settings.url, config_source)
        db = Database(target, pool_size=1, timeout=self.settings.connect_timeout, statement_timeout=self.settings.statement_timeout)
        db.open()
        try:
            applied = db.migrate() if action == "upgrade" else []
            status = db.status()
            status["applied_now"] = applied
            return status
        finally:
            db.close()

    @asynccontextmanager
    async def offline_store(self, config_source: str) -> AsyncIterator["Store"]:
        """The store's read and record methods outside any server (the CLI of
        another plugin, `streamvisor keys`): the database opened and migrated,
        with no writer, no recovery and no purge."""
        target = parse_url(self.settings.url, config_source)
        db = Database(target, pool_size=1, timeout=self.settings.connect_timeout, statement_timeout=self.settings.statement_timeout)

        def prepare() -> None:
            db.open()
            db.migrate()

        try:
            await trio.to_thread.run_sync(prepare)
        except BaseException:
            db.close()
            raise
        self.db = db
        try:
            yield self.store
        finally:
            self.db = None
            db.close()
