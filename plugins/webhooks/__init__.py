"""The `webhooks` plugin: tell other systems what happened, signed, and never lost.

Endpoints come from plugins.toml (`[[plugins.webhooks.endpoints]]`) and from
the admin API (`/admin/webhooks`); both are kept as records in the store, so
every instance sharing the database sends to the same endpoints.

How an event travels:

- **A session's end** (`session.completed`, `.failed`, `.stopped`,
  `.interrupted`): the store calls this plugin's `on_session_end` hook while it
  writes the session's final row, and the deliveries (one outbox item per
  endpoint that wants the event) are written in that same transaction. A crash
  can neither lose the event nor announce a session the database does not have
  as ended.
- **Other events** (`key.budget_exceeded`, `upstream.circuit_opened`, and any
  type another plugin declares): this plugin's event listener writes the
  deliveries to the outbox when the event comes.
- **Delivery**: the `dispatcher` service claims what is due from each endpoint's
  queue (a lease in the store: among several instances each delivery is sent by
  one), with at most `max_concurrent` attempts per endpoint in flight. An
  attempt resolves and checks the URL (guard.py), POSTs the signed payload and
  settles the item: a 2xx is delivered, a 410 disables the endpoint, anything
  else is tried again on the retry schedule (or after `Retry-After`), until the
  schedule runs out and the delivery is marked failed. Every attempt is kept in
  the delivery log.

Payloads are small JSON (ids, state, usage and cost) and never hold content,
unless an endpoint sets `include_content`.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import ipaddress
import logging
import math
import random
import secrets
import time
from typing import Any, Iterable

import attrs
import orjson
import trio
from prometheus_client import Counter, Histogram
from quart import request

from streamvisor.hooks import (
    Event,
    Health,
    InvalidRequest,
    NotFound,
    OutboxItem,
    SessionQuery,
    QueuedItem,
    QueueStore,
    RecordStore,
    StoredSession,
    APIError,
    ConfigError,
    hookimpl,
    httpclient,
    json_response,
    listens_to,
    positive,
    read_json,
    require_admin,
)

from . import guard
from .signing import check_secret, generate_secret, signature_header

log = logging.getLogger("streamvisor.webhooks")

__all__ = ["WebhooksPlugin", "Settings", "EndpointSettings", "SESSION_EVENTS"]

#: A session's final state -> the event announcing it.
SESSION_EVENTS = {
    "completed": "session.completed",
    "failed": "session.failed",
    "stopped": "session.stopped",
    "disconnected": "session.stopped",
    "shutdown": "session.stopped",
    "interrupted": "session.interrupted",
}
#: The core's session event types: a webhook names a session's end by the
#: `session.*` names instead, and per-chunk events are never sent.
CORE_EVENT_TYPES = ("created", "started", "first_token", "chunk", "completed", "failed", "stopped", "disconnected")
#: A manual test delivery (`POST /admin/webhooks/{id}/test`).
TEST_EVENT = "webhook.test"
ENDPOINT_KIND = "webhooks:endpoint"
#: Attempts kept in a delivery's log (the oldest go first).
MAX_LOGGED_ATTEMPTS = 20
#: Bytes of a receiver's answer kept in the log.
RESPONSE_SNIPPET = 512
MAX_LISTED = 100
#: How long after a session's end its deliveries are looked for: the store
#: writes a session's end at its next tick (50 ms).
SESSION_END_DELAY = 0.07
#: An endpoint holds at most this many times its max_concurrent deliveries.
PREFETCH = 3
#: Attempts' results are written together, this long after the first of them.
SETTLE_DELAY = 0.05
#: How far back start-up looks for interrupted sessions not yet announced.
INTERRUPTED_DAYS = 7
#: Standard Webhooks' schedule after the first attempt: 5 s, 5 min, 30 min,
#: 2 h, 5 h, 10 h, 10 h; then a day twice: about three days in all.
DEFAULT_SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0, 86400.0, 86400.0]


def _check_schedule(instance: Any, attribute: Any, value: list[float]) -> None:
    if any(not (delay >= 0) for delay in value):
        raise ValueError("every delay of retry_schedule_seconds is a number of seconds, at least 0")


@attrs.frozen
class EndpointSettings:
    """One `[[plugins.webhooks.endpoints]]` table."""

    url: str
    #: `whsec_` and base64 (`streamvisor.webhooks.generate_secret()` makes one).
    secret: str
    #: The events to send; the default is every session end.
    events: list[str] = attrs.field(factory=lambda: sorted(set(SESSION_EVENTS.values())))
    #: Its id in the admin API and the delivery log; by default from the URL.
    id: str = ""
    description: str = ""
    #: Secrets still signed with, during a rotation (the receiver may know only one).
    previous_secrets: list[str] = attrs.field(factory=list)
    #: Put the session's output into session.* payloads.
    include_content: bool = False
    allow_private: bool = False
    #: Networks or host names this endpoint may reach despite the guard.
    allow: list[str] = attrs.field(factory=list)
    #: None: the plugin's.
    max_concurrent: int | None = None
    timeout_seconds: float | None = None
    enabled: bool = True


@attrs.frozen
class Settings:
    endpoints: list[EndpointSettings] = attrs.field(factory=list)
    #: Delays before the second, third, ... attempt (after a failed one).
    retry_schedule_seconds: list[float] = attrs.field(factory=lambda: list(DEFAULT_SCHEDULE), validator=_check_schedule)
    #: Each delay is moved by up to this fraction, either way, so that
    #: deliveries that failed together do not all come back together.
    jitter: float = attrs.field(default=0.1, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(1)))
    #: One attempt (resolving, connecting, sending, the answer) takes at most this long.
    timeout_seconds: float = attrs.field(default=15.0, validator=positive)
    #: Attempts in flight per endpoint, per instance.
    max_concurrent: int = attrs.field(default=8, validator=positive)
    #: How often the dispatcher looks for due deliveries.
    poll_interval_seconds: float = attrs.field(default=1.0, validator=positive)
    #: How often endpoints changed by another instance are read again.
    refresh_seconds: float = attrs.field(default=10.0, validator=positive)
    #: A Retry-After longer than this is cut to it.
    max_retry_after_seconds: float = attrs.field(default=86400.0, validator=positive)
    #: After a rotation, the old secret is still signed with for this long.
    rotation_grace_seconds: float = attrs.field(default=86400.0, validator=attrs.validators.ge(0))
    #: For every endpoint (each can also set its own).
    allow_private: bool = False
    allow: list[str] = attrs.field(factory=list)
    #: Output characters an include_content payload carries at most.
    max_content_chars: int = attrs.field(default=200_000, validator=positive)


@attrs.frozen
class Endpoint:
    """An endpoint as the dispatcher uses it (from its record)."""

    id: str
    url: str
    secret: str
    events: frozenset[str]
    #: (secret, until) pairs still signed with.
    old_secrets: tuple[tuple[str, float], ...] = ()
    description: str = ""
    include_content: bool = False
    allow_private: bool = False
    allow: tuple[str, ...] = ()
    max_concurrent: int | None = None
    timeout_seconds: float | None = None
    enabled: bool = True
    #: Why it was switched off (a 410), when it was.
    disabled_reason: str | None = None
    #: "config" (plugins.toml) or "api".
    source: str = "api"
    created_at: float = 0.0

    @classmethod
    def of(cls, endpoint_id: str, data: dict[str, Any]) -> "Endpoint":
        return cls(
            id=endpoint_id,
            url=data["url"],
            secret=data["secret"],
            events=frozenset(data.get("events") or ()),
            # An old secret of plugins.toml has no end (None): the operator removes it.
            old_secrets=tuple((s, math.inf if u is None else float(u)) for s, u in data.get("old_secrets") or ()),
            description=data.get("description") or "",
            include_content=bool(data.get("include_content")),
            allow_private=bool(data.get("allow_private")),
            allow=tuple(data.get("allow") or ()),
            max_concurrent=data.get("max_concurrent"),
            timeout_seconds=data.get("timeout_seconds"),
            enabled=bool(data.get("enabled", True)),
            disabled_reason=data.get("disabled_reason"),
            source=data.get("source") or "api",
            created_at=float(data.get("created_at") or 0.0),
        )

    def data(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "secret": self.secret,
            "events": sorted(self.events),
            "old_secrets": [[s, None if math.isinf(u) else u] for s, u in self.old_secrets],
            "description": self.description,
            "include_content": self.include_content,
            "allow_private": self.allow_private,
            "allow": list(self.allow),
            "max_concurrent": self.max_concurrent,
            "timeout_seconds": self.timeout_seconds,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "source": self.source,
            "created_at": self.created_at,
        }

    def to_json(self) -> dict[str, Any]:
        """What the admin API shows: everything but the secrets."""
        body = {"id": self.id, "object": "webhook_endpoint", **self.data()}
        del body["secret"], body["old_secrets"]
        body["secret_hint"] = self.secret[:10] + "..."
        body["rotating"] = bool(self.old_secrets)
        return body

    @property
    def queue(self) -> str:
        return f"webhooks:{self.id}"

    def signing_secrets(self, now: float) -> list[str]:
        return [self.secret] + [s for s, until in self.old_secrets if until > now]


@attrs.frozen
class _Metrics:
    attempts: Counter
    enqueued: Counter
    seconds: Histogram


class WebhooksPlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.store: Any = None
        self.owner = ""
        self.endpoints: dict[str, Endpoint] = {}
        self._inflight: dict[str, int] = {}
        #: Deliveries claimed per endpoint that wait for a worker (bounded by PREFETCH).
        self._local: dict[str, collections.deque[QueuedItem]] = {}
        self._wake = trio.Event()
        #: Set by the session-end hook (any thread) to when the first session
        #: ended since the dispatcher last looked: it looks once the store's
        #: write that carries the deliveries has committed.
        self._soon: float | None = None
        #: The last look found more due than there were free slots.
        self._backlog = False
        #: Set once the endpoints were read from the store.
        self._ready = trio.Event()
        self._configured: list[tuple[str, EndpointSettings]] = []
        self._stopping = False
        self._deliveries: trio.CancelScope | None = None
        self._dispatcher_done = trio.Event()
        #: Attempts' results not yet written: (queue, item id, state, data, due_at).
        self._settlements: list[tuple[str, str, str, dict[str, Any], float | None]] = []
        self._settle_wake = trio.Event()
        #: Keep-alive clients per (endpoint, origin, checked address), and when each was last used.
        self._clients: dict[tuple[str, str, str], httpclient.HTTPClient] = {}
        self._client_used: dict[tuple[str, str, str], float] = {}
        self.counts = {"delivered": 0, "failed_attempts": 0, "failed": 0, "refused": 0, "disabled": 0, "enqueue_errors": 0}
        self.last_error: str | None = None
        self._policy = guard.Policy.of(settings.allow_private, settings.allow)
        for endpoint in settings.endpoints:
            for secret in [endpoint.secret, *endpoint.previous_secrets]:
                check_secret(secret)
            guard.Policy.of(endpoint.allow_private, endpoint.allow)

    # -- hooks ------------------------------------------------------------------------------

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        self.owner = runtime.instance_id
        registry = runtime.metrics
        self.metrics = _Metrics(
            attempts=Counter("streamvisor_webhook_attempts", "Webhook delivery attempts, by result.", ["result"], registry=registry),
            enqueued=Counter("streamvisor_webhook_enqueued", "Webhook deliveries written to the outbox, by event.", ["event"], registry=registry),
            seconds=Histogram(
                "streamvisor_webhook_attempt_seconds", "Time of one webhook delivery attempt.", registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
        )
        admin = require_admin
        register("/admin/webhooks", admin(self.create_view), methods=("POST",), openapi=_op("Add a webhook endpoint; its secret is in this answer only", 201))
        register("/admin/webhooks", admin(self.list_view), openapi=_op("List webhook endpoints"))
        register("/admin/webhooks/<endpoint_id>", admin(self.show_view), openapi=_op("A webhook endpoint"))
        register("/admin/webhooks/<endpoint_id>", admin(self.update_view), methods=("PATCH",), openapi=_op("Change a webhook endpoint"))
        register("/admin/webhooks/<endpoint_id>", admin(self.delete_view), methods=("DELETE",), openapi=_op("Remove a webhook endpoint"))
        register("/admin/webhooks/<endpoint_id>/rotate", admin(self.rotate_view), methods=("POST",), openapi=_op("Give an endpoint a new secret; the old one is signed with for rotation_grace_seconds"))
        register("/admin/webhooks/<endpoint_id>/test", admin(self.test_view), methods=("POST",), openapi=_op("Send a webhook.test event to an endpoint", 202))
        register("/admin/webhooks/<endpoint_id>/deliveries", admin(self.deliveries_view), openapi=_op("An endpoint's delivery log, newest first"))
        register("/admin/webhooks/<endpoint_id>/deliveries/<message_id>", admin(self.delivery_view), openapi=_op("One delivery with its attempts"))
        register(
            "/admin/webhooks/<endpoint_id>/deliveries/<message_id>/retry", admin(self.retry_view), methods=("POST",),
            openapi=_op("Send a delivery again now (the same webhook-id)", 202),
        )

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("dispatcher", self.run_dispatcher)
        register("endpoints", self.run_refresh)

    @hookimpl
    def register_health_checks(self, register: Any) -> None:
        register("outbox", self.check)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("deliveries", self.panel)

    @hookimpl
    async def startup(self, runtime: Any) -> None:
        store = runtime.store
        if not isinstance(store, QueueStore) or not isinstance(store, RecordStore):
            raise ConfigError(
                runtime.config.source, "plugins.webhooks", "a store with an outbox (contract 1.5): enable [plugins.store]",
                "no store, or one without on_session_end/claim/settle",
            )
        self.store = store
        known = self.event_names()
        seen: set[str] = set()
        configured = []
        for index, settings in enumerate(self.settings.endpoints):
            where = f"plugins.webhooks.endpoints[{index}]"
            unknown = sorted(set(settings.events) - known)
            if unknown or not settings.events:
                raise ConfigError(runtime.config.source, f"{where}.events", f"event names among: {', '.join(sorted(known))}", f"unknown: {', '.join(unknown) or '(none given)'}")
            try:
                guard.check_url(settings.url, guard.Policy.of(settings.allow_private or self.settings.allow_private, [*settings.allow, *self.settings.allow]))
            except guard.Refused as exc:
                raise ConfigError(runtime.config.source, f"{where}.url", "an https URL (or allow_private)", str(exc)) from None
            endpoint_id = settings.id or "ep_" + hashlib.sha256(settings.url.encode()).hexdigest()[:16]
            if endpoint_id in seen:
                raise ConfigError(runtime.config.source, f"{where}.id", "a unique id", f"{endpoint_id!r} is used twice (two endpoints with one URL need an id each)")
            seen.add(endpoint_id)
            configured.append((endpoint_id, settings))
        self._configured = configured
        # Known at once (the store is not open yet: its start-up comes later):
        # the sessions its start-up marks interrupted find these endpoints.
        now = time.time()
        self.endpoints = {endpoint_id: Endpoint.of(endpoint_id, self._config_data(settings, None, now)) for endpoint_id, settings in configured}
        store.on_session_end(self.on_session_end)

    def _config_data(self, settings: EndpointSettings, old: dict[str, Any] | None, now: float) -> dict[str, Any]:
        """The record of an endpoint of plugins.toml (`old`: its record so far)."""
        old = old or {}
        return {
            "url": settings.url, "secret": settings.secret, "events": sorted(settings.events),
            "old_secrets": [[s, None] for s in settings.previous_secrets], "description": settings.description,
            "include_content": settings.include_content, "allow_private": settings.allow_private, "allow": list(settings.allow),
            "max_concurrent": settings.max_concurrent, "timeout_seconds": settings.timeout_seconds, "source": "config",
            "created_at": old.get("created_at") or now,
            # A 410 switched it off until someone switches it on again.
            "enabled": settings.enabled and old.get("enabled", True),
            "disabled_reason": old.get("disabled_reason") if settings.enabled else "enabled = false in plugins.toml",
        }

    async def load(self) -> None:
        """Once the store is open: keep the config's endpoints as records too (so
        that a 410's disabling and the delivery log outlive a restart, and other
        instances see them), read every endpoint, and queue the
        session.interrupted events of sessions the store marked while this
        plugin did not know its endpoints yet."""
        now = time.time()
        for endpoint_id, settings in self._configured:
            old = await self.store.get_record(ENDPOINT_KIND, endpoint_id)
            await self.store.put_record(ENDPOINT_KIND, endpoint_id, self._config_data(settings, old, now))
        await self.refresh()
        await self.catch_up_interrupted(now - INTERRUPTED_DAYS * 86400)

    async def catch_up_interrupted(self, since: float) -> int:
        """Queue `session.interrupted` for sessions interrupted since `since`
        that an endpoint wants and has not been sent (ids are the sessions':
        one already queued is left alone). Only those that ended after the
        endpoint was created."""
        wanting = [e for e in self.endpoints.values() if e.enabled and SESSION_EVENTS["interrupted"] in e.events]
        if not wanting:
            return 0
        queued = 0
        query = SessionQuery(state="interrupted", since=since, limit=100)
        for _ in range(100):
            page = await self.store.sessions(query)
            items = []
            for stored in page:
                at = stored.created_at + (stored.timings.get("duration_ms") or 0) / 1000
                for item in self.on_session_end(stored, at):
                    endpoint = self.endpoints.get(item.queue.removeprefix("webhooks:"))
                    if endpoint is not None and at >= endpoint.created_at:
                        items.append(item)
            if items:
                await self.store.enqueue(items)
                queued += len(items)
            if len(page) < query.limit:
                break
            query = attrs.evolve(query, after=(page[-1].created_at, page[-1].id))
        return queued

    @hookimpl
    async def shutdown(self) -> None:
        # Before the store closes: attempts in flight give their deliveries back
        # (due at once), so the next start sends them without waiting for a lease.
        self._stopping = True
        if self._deliveries is not None:
            self._deliveries.cancel()
            with trio.move_on_after(3):
                await self._dispatcher_done.wait()
        self._give_back_waiting()
        with trio.move_on_after(2):
            await self.flush_settlements()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    @hookimpl
    @listens_to(exclude=CORE_EVENT_TYPES)
    async def on_event(self, event: Event) -> None:
        wanted = [e for e in self.endpoints.values() if e.enabled and event.type in e.events]
        if not wanted or self.store is None:
            return
        message_id = "msg_" + secrets.token_hex(12)
        payload = {"type": event.type, "timestamp": _iso(event.at), "data": _event_data(event)}
        items = [OutboxItem(e.queue, message_id, {"event": event.type, "payload": payload, "attempts": []}) for e in wanted]
        for attempt in range(3):
            try:
                await self.store.enqueue(items)
                break
            except APIError as exc:
                self.last_error = f"writing a {event.type} event to the outbox failed: {exc.message}"
                if attempt == 2:
                    self.counts["enqueue_errors"] += 1
                    log.error("webhooks: %s; the event is lost", self.last_error)
                    return
                await trio.sleep(0.5 * (attempt + 1))
        self.metrics.enqueued.labels(event.type).inc(len(items))
        self._wake.set()

    # -- the session end (the store's hook) ------------------------------------------------

    def event_names(self) -> set[str]:
        names = set(SESSION_EVENTS.values()) | {TEST_EVENT}
        if self.runtime is not None:
            names |= {name for name in self.runtime.events.types if name not in CORE_EVENT_TYPES}
        return names

    def on_session_end(self, session: StoredSession, at: float) -> list[OutboxItem]:
        """The deliveries announcing a session's end, written by the store with
        its final row. Quick and without I/O: it may run in a worker thread."""
        name = SESSION_EVENTS.get(session.state)
        if name is None:
            return []
        wanted = [e for e in self.endpoints.values() if e.enabled and name in e.events]
        if not wanted:
            return []
        # One id per session end: the same on every endpoint and every retry,
        # and again if the store writes the batch twice.
        message_id = "msg_" + session.id.removeprefix("sess_")
        payload = {"type": name, "timestamp": _iso(at), "data": _session_data(session, at)}
        if self._soon is None:
            self._soon = time.monotonic()
        if trio.lowlevel.in_trio_run():  # not in the store's worker thread
            self._wake.set()
        return [OutboxItem(e.queue, message_id, {"event": name, "payload": payload, "attempts": []}) for e in wanted]

    # -- endpoints -----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read every endpoint from the store."""
        endpoints: dict[str, Endpoint] = {}
        after = None
        while True:
            page = await self.store.list_records(ENDPOINT_KIND, 500, after)
            for endpoint_id, data in page:
                endpoints[endpoint_id] = Endpoint.of(endpoint_id, data)
            if len(page) < 500:
                break
            after = page[-1][0]
        self.endpoints = endpoints

    async def run_refresh(self) -> None:
        backoff = 0.1
        while not self._ready.is_set():
            try:
                await self.load()
                self._ready.set()
            except APIError as exc:
                # The store is not open yet (its start-up comes after this
                # plugin's), or cannot answer: the deliveries wait.
                if backoff >= 1:
                    log.warning("webhooks: loading the endpoints failed (%s); trying again in %g s", exc.message, backoff)
                await trio.sleep(backoff)
                backoff = min(10.0, backoff * 2)
        while True:
            await trio.sleep(self.settings.refresh_seconds)
            try:
                await self.refresh()
            except APIError as exc:
                log.warning("webhooks: reading the endpoints failed (%s); kept the ones known", exc.message)

    async def _loaded(self) -> None:
        """Wait (a little) until the endpoints were read from the store: right
        after start-up the store may not be open yet."""
        if not self._ready.is_set():
            with trio.move_on_after(5):
                await self._ready.wait()
            if not self._ready.is_set():
                raise APIError("The webhook endpoints are not loaded yet: the store does not answer.", status=503, type="server_error", code="store_unavailable", headers={"Retry-After": "1"})

    async def _endpoint(self, endpoint_id: str) -> Endpoint:
        await self._loaded()
        data = await self.store.get_record(ENDPOINT_KIND, endpoint_id)
        if data is None:
            raise NotFound(f"No webhook endpoint '{endpoint_id}'.", param="endpoint_id", code="webhook_not_found")
        endpoint = Endpoint.of(endpoint_id, data)
        self.endpoints[endpoint_id] = endpoint
        return endpoint

    async def _save(self, endpoint: Endpoint) -> None:
        await self.store.put_record(ENDPOINT_KIND, endpoint.id, endpoint.data())
        self.endpoints[endpoint.id] = endpoint

    def _policy_of(self, endpoint: Endpoint) -> guard.Policy:
        return guard.Policy.of(endpoint.allow_private or self.settings.allow_private, [*endpoint.allow, *self.settings.allow])

    # -- delivery ---------------------------------------------------------------------------

    async def run_dispatcher(self) -> None:
        await self._ready.wait()
        try:
            async with trio.open_nursery() as nursery:
                self._deliveries = nursery.cancel_scope
                nursery.start_soon(self.run_settler)
                backoff = self.settings.poll_interval_seconds
                while not self._stopping:
                    ended, self._soon = self._soon, None
                    if ended is not None and not self._backlog:
                        # A session ended: its deliveries come with the store's
                        # next write (every 50 ms). Look once that is done, with
                        # the sessions that end meanwhile. With a backlog there
                        # is due work already: no waiting then.
                        delay = ended + SESSION_END_DELAY - time.monotonic()
                        if delay > 0:
                            await trio.sleep(delay)
                    try:
                        self._backlog = await self.dispatch(nursery)
                        backoff = self.settings.poll_interval_seconds
                    except APIError as exc:
                        # The store cannot answer: the deliveries wait in it.
                        self.last_error = f"claiming deliveries failed: {exc.message}"
                        log.warning("webhooks: %s; trying again in %g s", self.last_error, backoff)
                        await trio.sleep(backoff)
                        backoff = min(30.0, backoff * 2)
                        continue
                    with trio.move_on_after(self.settings.poll_interval_seconds):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await self._close_idle_clients()
        finally:
            self._dispatcher_done.set()
        await trio.sleep_forever()

    async def dispatch(self, nursery: trio.Nursery) -> bool:
        """Claim what is due for every enabled endpoint with room, and start its
        workers. An endpoint holds at most `PREFETCH` times its `max_concurrent`
        deliveries at once (in flight, and claimed waiting for a worker), so a
        worker never waits for a claim; the lease covers the wait. Returns
        whether an endpoint may have more due than it had room for (a worker
        that runs out then makes the dispatcher look again at once)."""
        backlog = False
        for endpoint in list(self.endpoints.values()):
            if not endpoint.enabled:
                continue
            slots = endpoint.max_concurrent or self.settings.max_concurrent
            waiting = self._local.setdefault(endpoint.id, collections.deque())
            room = PREFETCH * slots - self._inflight.get(endpoint.id, 0) - len(waiting)
            if room <= 0:
                backlog = True
                continue
            claimed = await self.store.claim(endpoint.queue, self.owner, room, self._lease(endpoint))
            waiting.extend(claimed)
            while waiting and self._inflight.get(endpoint.id, 0) < slots:
                self._inflight[endpoint.id] = self._inflight.get(endpoint.id, 0) + 1
                nursery.start_soon(self._worker, endpoint.id)
            backlog = backlog or len(claimed) == room
        return backlog

    def _lease(self, endpoint: Endpoint) -> float:
        # A claimed delivery may wait for PREFETCH - 1 attempts before its own.
        return PREFETCH * (endpoint.timeout_seconds or self.settings.timeout_seconds) + 30

    async def _worker(self, endpoint_id: str) -> None:
        """Deliver the endpoint's claimed deliveries, one at a time, until none wait."""
        waiting = self._local[endpoint_id]
        try:
            while waiting:
                item = waiting.popleft()
                # With more due than there was room for, claim again while
                # this endpoint still has one round of work in hand: the
                # workers never wait for the claim, and a claim takes many.
                if self._backlog and len(waiting) <= self._slots(endpoint_id):
                    self._wake.set()
                endpoint = self.endpoints.get(endpoint_id)
                if endpoint is None or not endpoint.enabled:
                    # Switched off or removed meanwhile: give it back untouched.
                    self._settlements.append((item.queue, item.id, "pending", item.data, item.due_at))
                    self._settle_wake.set()
                    continue
                try:
                    await self.attempt(endpoint, item)
                except Exception:
                    log.exception("webhooks: delivering %s to %s failed unexpectedly", item.id, endpoint_id)
        finally:
            self._inflight[endpoint_id] -= 1

    def _slots(self, endpoint_id: str) -> int:
        endpoint = self.endpoints.get(endpoint_id)
        return (endpoint.max_concurrent if endpoint is not None and endpoint.max_concurrent else None) or self.settings.max_concurrent

    def _give_back_waiting(self) -> None:
        """At shutdown: the claimed deliveries no worker started go back, due at once."""
        now = time.time()
        for waiting in self._local.values():
            while waiting:
                item = waiting.popleft()
                self._settlements.append((item.queue, item.id, "pending", item.data, now))

    async def attempt(self, endpoint: Endpoint, item: QueuedItem) -> None:
        """One delivery attempt, and the item settled by its result."""
        data = dict(item.data)
        attempts = list(data.get("attempts") or ())
        number = int(data.get("attempt_count") or 0) + 1
        timeout = endpoint.timeout_seconds or self.settings.timeout_seconds
        started = time.time()
        t0 = time.perf_counter()
        status: int | None = None
        error: str | None = None
        snippet = ""
        retry_after: float | None = None
        refused = False
        try:
            body = await self._body(endpoint, data)
            with trio.move_on_after(timeout) as scope:
                status, snippet, retry_after = await self._post(endpoint, item.id, body)
            if scope.cancelled_caught:
                error = f"no answer within {timeout:g} s"
        except guard.Refused as exc:
            refused, error = True, str(exc)
        except httpclient.TransportError as exc:
            error = str(exc)
        except trio.Cancelled:
            # Shutting down mid-attempt: give the delivery back, due at once,
            # without counting the attempt (the receiver may or may not have
            # it: its webhook-id lets it tell). The shutdown hook writes it.
            self._settlements.append((endpoint.queue, item.id, "pending", item.data, time.time()))
            raise
        elapsed = time.perf_counter() - t0
        self.metrics.seconds.observe(elapsed)
        record = {"attempt": number, "at": round(started, 3), "duration_ms": round(elapsed * 1000, 1), "status": status, "error": error, "response": snippet or None, "instance": self.runtime.instance}
        attempts = (attempts + [record])[-MAX_LOGGED_ATTEMPTS:]
        data.update(attempts=attempts, attempt_count=number, last_attempt_at=record["at"])
        now = time.time()
        due: float | None = None
        if status is not None and 200 <= status < 300:
            state, result = "done", "delivered"
            data.update(status="delivered", delivered_at=round(now, 3))
        elif refused:
            state, result = "dead", "refused"
            data.update(status="refused")
            log.warning("webhooks: not sending %s to endpoint %s: %s", item.id, endpoint.id, error)
        elif status == 410:
            state, result = "dead", "disabled"
            data.update(status="endpoint_disabled")
            await self._disable(endpoint, f"the receiver answered 410 Gone at {_iso(now)}")
        else:
            schedule = self.settings.retry_schedule_seconds
            if number - 1 < len(schedule):
                delay = schedule[number - 1]
                delay *= 1 + random.uniform(-self.settings.jitter, self.settings.jitter)
                if retry_after is not None:
                    delay = min(retry_after, self.settings.max_retry_after_seconds)
                state, result, due = "pending", "failed_attempt", now + delay
                data.update(status="retrying", next_attempt_at=round(due, 3))
            else:
                state, result = "dead", "failed"
                data.update(status="failed", next_attempt_at=None)
                log.warning("webhooks: gave up on %s to endpoint %s after %d attempts (%s)", item.id, endpoint.id, number, error or f"HTTP {status}")
        self.metrics.attempts.labels(result).inc()
        self.counts[result if result in self.counts else "failed_attempts"] += 1
        # Written with the other attempts that end within a few milliseconds,
        # in one transaction (the item stays leased to this instance until then).
        self._settlements.append((endpoint.queue, item.id, state, data, due))
        self._settle_wake.set()

    async def run_settler(self) -> None:
        """Write the attempts' results, together."""
        backoff = 0.02
        while True:
            await self._settle_wake.wait()
            self._settle_wake = trio.Event()
            await trio.sleep(SETTLE_DELAY)  # let the attempts ending now join the batch
            try:
                await self.flush_settlements()
                backoff = 0.02
            except APIError as exc:
                self.last_error = f"recording delivery results failed: {exc.message}"
                log.warning("webhooks: %s; trying again in %g s", self.last_error, backoff)
                await trio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                self._settle_wake.set()

    async def flush_settlements(self) -> None:
        """Write every pending result, one transaction per queue. What was not
        written (the store failed, or this was cancelled) goes back, and is
        tried again."""
        while self._settlements:
            batch, self._settlements = self._settlements, []
            by_queue: dict[str, list[tuple[str, str, dict[str, Any], float | None]]] = {}
            for queue, item_id, state, data, due in batch:
                by_queue.setdefault(queue, []).append((item_id, state, data, due))
            written: set[str] = set()
            try:
                for queue, settlements in by_queue.items():
                    answers = await self.store.settle_many(queue, self.owner, settlements)
                    written.add(queue)
                    for (item_id, _, _, _), kept in zip(settlements, answers):
                        if not kept:
                            log.warning("webhooks: the lease of %s in %s ran out before its attempt was recorded; another instance has it", item_id, queue)
            except BaseException:
                self._settlements[:0] = [entry for entry in batch if entry[0] not in written]
                raise

    async def _body(self, endpoint: Endpoint, data: dict[str, Any]) -> bytes:
        payload = data["payload"]
        if endpoint.include_content and str(data.get("event", "")).startswith("session."):
            payload = {**payload, "data": {**payload["data"], "output": await self._output(payload["data"]["session_id"])}}
        return orjson.dumps(payload)

    async def _output(self, session_id: str) -> dict[str, Any] | None:
        """The session's output, for an endpoint that asked for content."""
        stored = await self.store.get(session_id)
        if stored is None or stored.transcript != "kept":
            return None
        limit = self.settings.max_content_chars
        content: list[str] = []
        reasoning: list[str] = []
        size = 0
        start = 0
        while size < limit:
            deltas = await self.store.chunks(session_id, start, 1000)
            if not deltas:
                break
            for delta in deltas:
                if delta.content:
                    content.append(delta.content)
                    size += len(delta.content)
                if delta.reasoning:
                    reasoning.append(delta.reasoning)
                    size += len(delta.reasoning)
            start += len(deltas)
        text, thought = "".join(content), "".join(reasoning)
        return {"content": text[:limit], "reasoning": thought[:limit] or None, "truncated": size > limit}

    async def _post(self, endpoint: Endpoint, message_id: str, body: bytes) -> tuple[int, str, float | None]:
        target = await guard.resolve(endpoint.url, self._policy_of(endpoint))
        timeout = endpoint.timeout_seconds or self.settings.timeout_seconds
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature_header(endpoint.signing_secrets(time.time()), message_id, stamp, body),
        }
        # Connections are kept alive per endpoint and checked address: a name
        # that now resolves elsewhere gets a client (and connections) of its own.
        key = (endpoint.id, target.origin, target.address)
        client = self._clients.get(key)
        if client is None:
            slots = endpoint.max_concurrent or self.settings.max_concurrent
            client = self._clients[key] = httpclient.HTTPClient(
                target.origin, connect_to=target.address, max_connections=slots, max_idle=slots, idle_expiry=4.0,
                connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout, pool_timeout=timeout,
            )
        self._client_used[key] = time.monotonic()
        async with client.stream("POST", target.path, body=body, headers=headers) as response:
            snippet = (await response.read(RESPONSE_SNIPPET)).decode("utf-8", "replace")
            return response.status, snippet, _retry_after(response.headers.get("retry-after"))

    async def _close_idle_clients(self) -> None:
        """Let go of the clients of endpoints not sent to for 30 s."""
        now = time.monotonic()
        for key in [k for k, used in self._client_used.items() if now - used > 30]:
            del self._client_used[key]
            client = self._clients.pop(key, None)
            if client is not None:
                await client.aclose()  # connections still in use close when their responses end

    async def _disable(self, endpoint: Endpoint, reason: str) -> None:
        self.counts["disabled"] += 1
        log.warning("webhooks: endpoint %s (%s) is disabled: %s", endpoint.id, endpoint.url, reason)
        try:
            current = await self._endpoint(endpoint.id)
            await self._save(attrs.evolve(current, enabled=False, disabled_reason=reason))
        except (APIError, NotFound) as exc:
            log.error("webhooks: could not record that endpoint %s is disabled (%s)", endpoint.id, exc)
            self.endpoints[endpoint.id] = attrs.evolve(endpoint, enabled=False, disabled_reason=reason)

    # -- readiness and status -------------------------------------------------------------

    async def check(self) -> Health:
        if not self._ready.is_set():
            return Health(False, "the endpoints are not read from the store yet")
        enabled = sum(1 for e in self.endpoints.values() if e.enabled)
        return Health(True, f"{enabled} endpoints enabled, {sum(self._inflight.values())} attempts in flight")

    def panel(self) -> dict[str, Any]:
        return {
            "endpoints": len(self.endpoints),
            "enabled": sum(1 for e in self.endpoints.values() if e.enabled),
            "in_flight": {k: v for k, v in self._inflight.items() if v},
            **self.counts,
            "last_error": self.last_error,
        }

    # -- the admin API ----------------------------------------------------------------------

    async def create_view(self) -> Any:
        body = await read_json()
        fields = self._fields(body, partial=False)
        secret = fields.pop("secret", None) or generate_secret()
        endpoint = Endpoint(
            id="ep_" + secrets.token_hex(8), secret=secret, created_at=time.time(), source="api",
            **{k: (frozenset(v) if k == "events" else tuple(v) if k == "allow" else v) for k, v in fields.items()},
        )
        self._check_reachable(endpoint)
        await self._save(endpoint)
        return json_response({**endpoint.to_json(), "secret": secret}, 201, headers={"Location": f"/admin/webhooks/{endpoint.id}"})

    async def list_view(self) -> Any:
        await self._loaded()
        await self.refresh()
        return json_response({"object": "list", "data": [e.to_json() for e in sorted(self.endpoints.values(), key=lambda e: (e.created_at, e.id))]})

    async def show_view(self, endpoint_id: str) -> Any:
        return json_response((await self._endpoint(endpoint_id)).to_json())

    async def update_view(self, endpoint_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        fields = self._fields(await read_json(), partial=True)
        if endpoint.source == "config" and set(fields) - {"enabled"}:
            raise APIError(
                f"Endpoint '{endpoint_id}' is configured in plugins.toml: change it there (only 'enabled' can be set here).",
                status=409, type="invalid_request_error", code="configured_endpoint",
            )
        if "secret" in fields:
            raise InvalidRequest("a secret is changed with POST /admin/webhooks/{id}/rotate", param="secret")
        changes = {k: (frozenset(v) if k == "events" else tuple(v) if k == "allow" else v) for k, v in fields.items()}
        if changes.get("enabled"):
            changes["disabled_reason"] = None
        updated = attrs.evolve(endpoint, **changes)
        self._check_reachable(updated)
        await self._save(updated)
        return json_response(updated.to_json())

    async def delete_view(self, endpoint_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        if endpoint.source == "config":
            raise APIError(
                f"Endpoint '{endpoint_id}' is configured in plugins.toml: remove it there.", status=409, type="invalid_request_error", code="configured_endpoint"
            )
        delete = getattr(self.store, "delete_record", None)
        if delete is not None:
            await delete(ENDPOINT_KIND, endpoint_id)
        else:  # a store without deletion: kept, switched off and marked
            await self.store.put_record(ENDPOINT_KIND, endpoint_id, {**endpoint.data(), "enabled": False, "disabled_reason": "deleted"})
        self.endpoints.pop(endpoint_id, None)
        return json_response({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})

    async def rotate_view(self, endpoint_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        if endpoint.source == "config":
            raise APIError(
                f"Endpoint '{endpoint_id}' is configured in plugins.toml: set its new secret there, with the old one in previous_secrets.",
                status=409, type="invalid_request_error", code="configured_endpoint",
            )
        now = time.time()
        until = now + self.settings.rotation_grace_seconds
        secret = generate_secret()
        old = tuple(pair for pair in endpoint.old_secrets if pair[1] > now) + ((endpoint.secret, until),)
        rotated = attrs.evolve(endpoint, secret=secret, old_secrets=old[-5:])
        await self._save(rotated)
        return json_response({**rotated.to_json(), "secret": secret, "previous_secret_until": round(until, 3)})

    async def test_view(self, endpoint_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        message_id = "msg_" + secrets.token_hex(12)
        now = time.time()
        payload = {"type": TEST_EVENT, "timestamp": _iso(now), "data": {"endpoint_id": endpoint.id, "instance": self.runtime.instance}}
        await self.store.enqueue([OutboxItem(endpoint.queue, message_id, {"event": TEST_EVENT, "payload": payload, "attempts": []})])
        self._wake.set()
        return json_response({"id": message_id, "object": "webhook_delivery", "event": TEST_EVENT, "status": "pending"}, 202)

    async def deliveries_view(self, endpoint_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        args = request.args
        known = {"limit", "before", "state"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise InvalidRequest(f"unknown query parameter '{unknown[0]}'; the parameters are: {', '.join(sorted(known))}", param=unknown[0])
        raw = args.get("limit", "20")
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LISTED:
            raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LISTED}, got '{raw[:40]}'", param="limit")
        state = args.get("state")
        if state not in (None, "pending", "done", "dead"):
            raise InvalidRequest("'state' must be pending, done or dead", param="state")
        before = None
        if args.get("before"):
            item = await self.store.queue_item(endpoint.queue, args["before"])
            if item is None:
                raise InvalidRequest("'before' is not a delivery of this endpoint", param="before")
            before = (item.created_at, item.id)
        limit = int(raw)
        items = await self.store.queue_items(endpoint.queue, limit + 1, before, state)
        page = items[:limit]
        return json_response({"object": "list", "data": [_delivery(i) for i in page], "has_more": len(items) > limit, "last_id": page[-1].id if page else None})

    async def delivery_view(self, endpoint_id: str, message_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        item = await self.store.queue_item(endpoint.queue, message_id)
        if item is None:
            raise NotFound(f"No delivery '{message_id}' to endpoint '{endpoint_id}'.", param="message_id", code="delivery_not_found")
        return json_response(_delivery(item, payload=True))

    async def retry_view(self, endpoint_id: str, message_id: str) -> Any:
        endpoint = await self._endpoint(endpoint_id)
        item = await self.store.queue_item(endpoint.queue, message_id)
        if item is None:
            raise NotFound(f"No delivery '{message_id}' to endpoint '{endpoint_id}'.", param="message_id", code="delivery_not_found")
        if not await self.store.requeue(endpoint.queue, message_id, time.time()):
            raise APIError(f"Delivery '{message_id}' is being attempted right now.", status=409, type="invalid_request_error", code="delivery_in_flight")
        if not endpoint.enabled:
            log.info("webhooks: delivery %s was queued again, but endpoint %s is disabled; it goes once it is enabled", message_id, endpoint_id)
        self._wake.set()
        fresh = await self.store.queue_item(endpoint.queue, message_id)
        return json_response(_delivery(fresh or item), 202)

    def _fields(self, body: Any, partial: bool) -> dict[str, Any]:
        """The admin API's endpoint fields, checked."""
        if not isinstance(body, dict):
            raise InvalidRequest("the body is a JSON object")
        allowed = {"url", "events", "secret", "description", "include_content", "allow_private", "allow", "max_concurrent", "timeout_seconds", "enabled"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidRequest(f"unknown field '{unknown[0]}'; the fields are: {', '.join(sorted(allowed))}", param=unknown[0])
        if not partial:
            for name in ("url", "events"):
                if name not in body:
                    raise InvalidRequest(f"'{name}' is required", param=name)
        fields: dict[str, Any] = {}
        for name, value in body.items():
            if name in ("url", "description", "secret"):
                if not isinstance(value, str) or (name != "description" and not value):
                    raise InvalidRequest(f"'{name}' must be a non-empty string", param=name)
                if name == "secret":
                    try:
                        check_secret(value)
                    except ValueError as exc:
                        raise InvalidRequest(str(exc), param="secret") from None
            elif name in ("include_content", "allow_private", "enabled"):
                if not isinstance(value, bool):
                    raise InvalidRequest(f"'{name}' must be true or false", param=name)
            elif name in ("events", "allow"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise InvalidRequest(f"'{name}' must be an array of strings", param=name)
                if name == "events":
                    known = self.event_names()
                    unknown_events = sorted(set(value) - known)
                    if unknown_events or not value:
                        raise InvalidRequest(
                            f"unknown event '{unknown_events[0]}'; the events are: {', '.join(sorted(known))}" if unknown_events else "'events' names at least one event",
                            param="events",
                        )
                else:
                    try:
                        guard.Policy.of(False, value)
                    except ValueError as exc:
                        raise InvalidRequest(str(exc), param="allow") from None
            elif name == "max_concurrent":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000):
                    raise InvalidRequest("'max_concurrent' must be an integer from 1 to 1000", param=name)
            elif name == "timeout_seconds":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 300):
                    raise InvalidRequest("'timeout_seconds' must be a number of seconds, more than 0 and at most 300", param=name)
            fields[name] = value
        return fields

    def _check_reachable(self, endpoint: Endpoint) -> None:
        """Refuse at once a URL the guard would never let through (a private
        address is checked again, resolved, at every attempt)."""
        policy = self._policy_of(endpoint)
        try:
            host = guard.check_url(endpoint.url, policy)[1]
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return
            if not policy.allow_private and not any(address in net for net in policy.networks):
                reason = guard.blocked_reason(address)
                if reason is not None:
                    raise guard.Refused(f"{address} is {reason}; allow it with allow_private or the endpoint's allow list")
        except guard.Refused as exc:
            raise InvalidRequest(str(exc), param="url", code="url_not_allowed") from None


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def _session_data(session: StoredSession, at: float) -> dict[str, Any]:
    usage = session.usage
    return {
        "session_id": session.id,
        "request_id": session.request_id,
        "state": session.state,
        "model": session.model,
        "provider": session.provider,
        "identity": session.identity,
        "team": session.team,
        "key_id": session.key_id,
        "background": session.background,
        "finish_reason": session.finish_reason,
        "usage": None if usage is None else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "cached_tokens": usage.cached_tokens,
            "exact": usage.exact,
        },
        "cost_usd": None if usage is None else usage.cost_usd,
        "error": session.error,
        "created_at": round(session.created_at, 3),
        "finished_at": round(at, 3),
        "duration_ms": session.timings.get("duration_ms"),
    }


def _event_data(event: Event) -> dict[str, Any]:
    data = dict(event.data)
    if event.session_id:
        data.update(session_id=event.session_id, request_id=event.request_id, model=event.model, provider=event.provider, identity=event.identity)
    return orjson.loads(orjson.dumps(data, default=str))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _delivery(item: QueuedItem, payload: bool = False) -> dict[str, Any]:
    data = item.data
    if item.state == "pending":
        leased = item.lease_until is not None and item.lease_until > time.time()
        state = "sending" if leased else "retrying" if data.get("attempt_count") else "pending"
    elif item.state == "done":
        state = "delivered"
    else:
        state = data.get("status") or "failed"
    body = {
        "id": item.id,
        "object": "webhook_delivery",
        "event": data.get("event"),
        "status": state,
        "attempt_count": data.get("attempt_count", 0),
        "created_at": round(item.created_at, 3),
        "next_attempt_at": round(item.due_at, 3) if item.state == "pending" else None,
        "delivered_at": data.get("delivered_at"),
        "attempts": data.get("attempts") or [],
    }
    if payload:
        body["payload"] = data.get("payload")
    return body


def _op(summary: str, status: int = 200) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "summary": summary,
        "description": "Needs the admin key (docs/plugins/webhooks.md).",
        "responses": {
            str(status): {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": {"description": "A bad field (`param` names it).", **error},
            "401": {"description": "No admin key, or a wrong one.", **error},
            "404": {"description": "No such endpoint or delivery.", **error},
            "409": {"description": "The endpoint is configured in plugins.toml, or the delivery is being attempted.", **error},
        },
    }
