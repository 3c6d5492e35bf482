"""The `cluster` plugin: several instances (worker processes, machines) share
their sessions through Redis.

- **Membership.** Every `beat_seconds` an instance writes its beat (id, name,
  pid, live sessions) to a key that expires `dead_after_seconds` later, and
  joins a set of members. `GET /admin/cluster` lists them.
- **Session directory.** Every session's owner is written to Redis as the
  session starts (batched: one pipeline per `publish_interval_ms` for all the
  sessions that started meanwhile). A request about a session this instance
  does not hold asks the directory, then the owner (`register_session_directory`):
  reading, following, stopping, deleting and `/completion` work through any
  instance.
- **Commands.** Each instance subscribes to its own channel. A stop (or a read)
  is a command published to the owner's channel; `PUBLISH` says whether the
  owner received it, and the owner answers on the asker's channel.
- **Published chunks.** A background session's chunks (or any session's, with
  `publish = "all"`, or once a follower elsewhere asks) are appended to a
  Redis stream as they are produced, with the session's end as the last entry.
  A follower on another instance reads it, with the same offsets as `id:`s.
- **Failure.** An instance whose beat expired is dead: one survivor (a SET NX
  decides which) has the store mark its live sessions `interrupted`, with
  their usage recorded once. Followers of its sessions get what it had
  published, then an `interrupted` end.
- **Degraded mode.** Without Redis, an instance serves its own sessions as if
  alone; readiness says what is degraded; it rejoins when Redis answers.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any, Literal

import attrs
import orjson
import trio
from prometheus_client import Counter

from streamvisor.hooks import (
    TERMINAL_TYPES,
    APIError,
    ConfigError,
    Event,
    Health,
    RedisError,
    RespClient,
    Session,
    completion_object,
    deltas_to_json,
    hookimpl,
    json_response,
    listens_to,
    positive,
    require_admin,
)

from . import wire
from .remote import Reader, Remote

log = logging.getLogger("streamvisor.cluster")

__all__ = ["ClusterPlugin", "Settings"]

#: Commands handled at once; past it a command is answered "busy".
MAX_HANDLERS = 256
#: Commands of this instance waiting for their answer at once, at most.
MAX_WAITING = 10_000
#: Live session ids a beat lists (the count is always whole).
BEAT_SESSIONS = 50


@attrs.frozen
class Settings:
    #: The Redis shared by the instances; empty: `[server] redis_url`.
    redis_url: str = ""
    #: Every key and channel of the plugin starts with this: instances with the
    #: same Redis and prefix form one cluster.
    key_prefix: str = "streamvisor:cluster:"
    #: How often an instance writes its beat.
    beat_seconds: float = attrs.field(default=2.0, validator=positive)
    #: An instance whose last beat is older is dead: its live sessions are
    #: marked interrupted. More than twice `beat_seconds`.
    dead_after_seconds: float = attrs.field(default=10.0, validator=positive)
    #: How long a command (stop, read) waits for the owner's answer.
    command_timeout_seconds: float = attrs.field(default=2.0, validator=positive)
    #: One Redis call takes at most this long.
    redis_timeout_seconds: float = attrs.field(default=2.0, validator=positive)
    #: Whose chunks are published as they are produced: "background" sessions
    #: (others once a follower elsewhere asks), or "all".
    publish: Literal["background", "all"] = "background"
    #: Directory entries and chunks are written at most this long after they
    #: happen, together in one pipeline.
    publish_interval_ms: int = attrs.field(default=20, validator=positive)
    #: A published session's stream (and its directory entry) lives this long
    #: after its end: followers from elsewhere resume within it (later ones
    #: replay from the store).
    stream_ttl_seconds: float = attrs.field(default=600.0, validator=positive)
    #: Entries one stream keeps at most (a long session's first ones go).
    max_stream_entries: int = attrs.field(default=100_000, validator=positive)
    #: A live session's directory entry is written to live this long, and
    #: renewed while the session runs; once it ends, its entry lives as long
    #: as its owner retains it (`[server] session_retention_seconds`, or
    #: `stream_ttl_seconds` when published), plus a minute.
    directory_ttl_seconds: float = attrs.field(default=3600.0, validator=positive)
    #: Directory entries waiting for Redis at most (while it is away); past it
    #: the oldest are dropped and counted.
    max_pending_entries: int = attrs.field(default=100_000, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.dead_after_seconds <= 2 * self.beat_seconds:
            raise ValueError(f"dead_after_seconds ({self.dead_after_seconds:g}) must be more than twice beat_seconds ({self.beat_seconds:g})")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ValueError("redis_url must be a redis:// or rediss:// URL")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")


@attrs.define(eq=False)
class _Published:
    session: Session
    #: Chunks appended to the stream so far.
    sent: int = 0
    #: Whether the stream's expiry was set.
    expires: bool = False


@attrs.define(eq=False)
class _Waiting:
    event: trio.Event = attrs.Factory(trio.Event)
    reply: dict[str, Any] | None = None


class ClusterPlugin:
    Settings = Settings
    streamvisor_contract = "1.3"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.client: Any = None
        self.instance_id = ""
        self.reader = Reader()
        self.started_at = time.time()
        #: Directory entries to write: session id -> (JSON, seconds to live).
        self._entries: dict[str, tuple[bytes, int]] = {}
        #: Directory entries (and streams) whose time to live changes: id -> seconds.
        self._expires: dict[str, int] = {}
        self._published: dict[str, _Published] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._handlers = 0
        self._wake = trio.Event()
        #: One publish at a time (the service's, and the shutdown's last one).
        self._publish_lock = trio.Lock()
        self._subscribed = False
        #: Set while subscribed: a command waits for it a moment after Redis came back.
        self._subscription = trio.Event()
        self._down_since: float | None = None
        self._last_error = ""
        self._error_logged = 0.0
        self.reaped: list[dict[str, Any]] = []
        self.dropped_entries = 0
        self.unpublished = 0
        self.last_beat: float | None = None

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def register_chunk_transformers(self, register: Any, runtime: Any) -> None:
        # The first hook with the runtime: the Redis and the instance id.
        self.runtime = runtime
        url = self.settings.redis_url or runtime.config.server.redis_url
        if not url:
            raise ConfigError(
                runtime.config.source, "plugins.cluster.redis_url", "the Redis the instances share (or [server] redis_url)", "none"
            )
        self.client = RespClient(url, self.settings.redis_timeout_seconds, max_connections=16)
        self.instance_id = runtime.instance_id
        registry = runtime.metrics
        self.commands = Counter("streamvisor_cluster_commands", "Commands sent to other instances, by operation and result.", ["op", "result"], registry=registry)
        self.redis_errors = Counter("streamvisor_cluster_redis_errors", "Redis calls of the cluster plugin that failed, by task.", ["task"], registry=registry)
        self.calls = Counter(
            "streamvisor_cluster_redis_calls", "Round trips to Redis of the cluster plugin (a pipeline counts once), by task.", ["task"], registry=registry
        )
        self.reaped_count = Counter("streamvisor_cluster_reaped_sessions", "Sessions of dead instances this one marked interrupted.", registry=registry)
        register(self.track)

    @hookimpl
    @listens_to(*TERMINAL_TYPES)
    def on_event(self, event: Event) -> None:
        """A session ended: its directory entry lives as long as its owner
        (or its stream) can still answer for it."""
        published = event.session_id in self._published or self.settings.publish == "all"
        ttl = int((self.settings.stream_ttl_seconds if published else self.runtime.config.server.session_retention_seconds) + 60)
        pending = self._entries.get(event.session_id)
        if pending is not None:
            self._entries[event.session_id] = (pending[0], ttl)
        else:
            self._expires[event.session_id] = ttl
        self._wake_publisher()

    @hookimpl
    def register_session_directory(self, register: Any) -> None:
        register(self)

    @hookimpl
    def register_routes(self, register: Any) -> None:
        register("/admin/cluster", require_admin(self.cluster_view), openapi=_CLUSTER_OP)

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("beat", self.run_beat)
        register("commands", self.run_commands)
        register("publisher", self.run_publisher)
        register("reader", lambda: self.reader.run(self.client, self._failed))

    @hookimpl
    def register_health_checks(self, register: Any) -> None:
        register("redis", self.check)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("cluster", self.panel)

    @hookimpl
    async def startup(self) -> None:
        try:
            await self.client.execute("PING")
            log.info("cluster: instance %s joins through %s", self.instance_id, self._shown_url())
        except Exception as exc:
            self._failed("startup", exc)
            log.warning("cluster: Redis does not answer (%s); serving alone until it does", _describe(exc))

    @hookimpl
    async def shutdown(self) -> None:
        # Every session has ended: publish their ends, then leave. Bounded: a
        # Redis that hangs must not eat the server's whole grace period.
        with trio.move_on_after(2):
            for _ in range(3):
                if not self._published and not self._entries:
                    break
                await self.publish_once()
        with trio.move_on_after(1):
            try:
                await self.client.pipeline([("DEL", self.key("member", self.instance_id)), ("SREM", self.key("members"), self.instance_id)])
            except Exception as exc:
                self._failed("leave", exc)
            async with self._publish_lock:
                for published in self._published.values():
                    published.session.unhold()
                self._published.clear()
        await self.client.aclose()

    # -- keys and errors -----------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.settings.key_prefix + ":".join(parts)

    def _shown_url(self) -> str:
        url = self.settings.redis_url or self.runtime.config.server.redis_url
        return url.split("@")[-1] if "@" in url else url

    def _failed(self, task: str, exc: BaseException) -> None:
        self.redis_errors.labels(task).inc()
        self._last_error = f"{task}: {_describe(exc)}"
        if isinstance(exc, RedisError):
            # Redis answered, with an error: it is there (a bug, or a key of the
            # wrong type under our prefix), not a reason for degraded mode.
            log.warning("cluster: Redis refused a command (%s)", self._last_error)
            return
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("cluster: Redis failed (%s); each instance serves its own sessions until it is back", self._last_error)
            self._error_logged = now
        elif now - self._error_logged > 30:
            log.warning("cluster: Redis still failing (%s)", self._last_error)
            self._error_logged = now

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info("cluster: Redis answers again after %.1f s; rejoined", time.time() - self._down_since)
            self._down_since = None

    def unavailable(self, exc: BaseException) -> APIError:
        self._failed("follow", exc)
        log.warning("cluster: a session on another instance could not be reached: %s", _describe(exc))
        return APIError(
            "The cluster's Redis does not answer: this session runs on another instance and cannot be reached now.",
            status=503,
            type="server_error",
            code="cluster_unavailable",
        )

    # -- the directory, written as sessions start ---------------------------------------

    def track(self, session: Session) -> None:
        """The chunk-transformer factory: a directory entry for every session,
        and publishing for those that are followed from elsewhere."""
        entries = self._entries
        if len(entries) >= self.settings.max_pending_entries:
            del entries[next(iter(entries))]
            self.dropped_entries += 1
        entry = {
            "o": self.instance_id,
            "i": session.identity,
            "t": session.team,
            "m": session.model,
            "c": session.created_at,
            "u": session.request.include_usage,
            "b": session.background,
        }
        entries[session.id] = (orjson.dumps(entry), int(self.settings.directory_ttl_seconds))
        if session.background or self.settings.publish == "all":
            self._publish(session)
        else:
            self._wake_publisher()
        return None

    def _publish(self, session: Session) -> bool:
        """Append this session's chunks to its stream from now on. False when
        its first chunks are gone from memory already."""
        if session.id in self._published:
            return True
        if session.dropped_chunks:
            return False
        if self._down_since is not None and time.time() - self._down_since > 5:
            self.unpublished += 1
            return False  # held buffers would pile up while Redis is away
        session.hold()
        self._published[session.id] = _Published(session)
        self._wake_publisher()
        return True

    def _wake_publisher(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    async def run_publisher(self) -> None:
        interval = self.settings.publish_interval_ms / 1000
        backoff = interval
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.publish_once()
                self._recovered()
                backoff = interval
            except Exception as exc:
                self._failed("publisher", exc)
                self._give_up_held()
                backoff = min(2.0, backoff * 2)
                self._wake.set()
            await trio.sleep(backoff)
            if self._published:
                self._wake_publisher()

    def _give_up_held(self) -> None:
        """Redis is away: finished sessions stop waiting to be published (their
        held buffers would count against the server's memory bound)."""
        if self._down_since is None or time.time() - self._down_since < 5:
            return
        for session_id, published in list(self._published.items()):
            if published.session.finished:
                published.session.unhold()
                del self._published[session_id]
                self.unpublished += 1

    async def publish_once(self) -> None:
        """One pipeline: the new directory entries, the new chunks of every
        published session, and the ends of those that finished."""
        async with self._publish_lock:
            await self._publish_batch()

    async def _publish_batch(self) -> None:
        commands: list[tuple[Any, ...]] = []
        entries = self._entries
        written = list(entries.items())
        for session_id, (entry, ttl) in written:
            commands.append(("SET", self.key("dir", session_id), entry, "EX", ttl))
        expires, self._expires = self._expires, {}
        for session_id, ttl in expires.items():
            commands.append(("EXPIRE", self.key("dir", session_id), ttl))
        progress: list[tuple[_Published, int, bool]] = []
        for published in self._published.values():
            session = published.session
            finished = session.finished
            count = len(session.chunks)
            if count > published.sent:
                stream = self.key("chunks", session.id)
                batch = session.chunks[published.sent : count]
                commands.append(
                    ("XADD", stream, "MAXLEN", "~", self.settings.max_stream_entries, wire.entry_id(published.sent), "d", deltas_to_json(batch))
                )
                if not published.expires:
                    commands.append(("EXPIRE", stream, int(self.settings.stream_ttl_seconds + self.settings.directory_ttl_seconds)))
            if finished:
                stream = self.key("chunks", session.id)
                end = {
                    "state": session.state,
                    "finish_reason": session.finish_reason,
                    "usage": wire.usage_json(session.usage),
                    "error": None if session.error is None else session.error.summary(),
                }
                commands.append(("XADD", stream, wire.entry_id(count), "end", orjson.dumps(end)))
                commands.append(("EXPIRE", stream, int(self.settings.stream_ttl_seconds)))
            progress.append((published, count, finished))
        if not commands:
            return
        self.calls.labels("publisher").inc()
        try:
            replies = await self.client.pipeline(commands)
        except BaseException:
            for session_id, ttl in expires.items():
                self._expires.setdefault(session_id, ttl)  # again next time
            raise
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        for session_id, item in written:
            if entries.get(session_id) is item:
                del entries[session_id]
        for published, count, finished in progress:
            published.sent = count
            published.expires = True
            # Given up meanwhile (Redis was away for long): unheld already.
            if finished and self._published.get(published.session.id) is published:
                published.session.unhold()
                del self._published[published.session.id]
        if errors:
            # Redis answered, with an error for some commands (an entry id out of
            # order, when a cut-off pipeline had been applied already): counted
            # and logged, never retried as is. Redis itself is fine.
            self.redis_errors.labels("publish").inc(len(errors))
            log.warning("cluster: %d of %d published commands failed: %s", len(errors), len(commands), errors[0])

    # -- membership ----------------------------------------------------------------------

    def _renew(self, live: list[Session]) -> None:
        """Sessions that outlive half their entry's time get it renewed."""
        ttl = self.settings.directory_ttl_seconds
        old = time.time() - ttl / 2
        for session in live:
            if session.created_at < old and session.id not in self._expires:
                self._expires[session.id] = int(ttl)

    def beat(self) -> dict[str, Any]:
        live = self.runtime.sessions.live()
        self._renew(live)
        return {
            "id": self.instance_id,
            "name": self.runtime.instance,
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "started_at": self.started_at,
            "beat_at": time.time(),
            "live_sessions": len(live),
            "sessions": [s.id for s in live[:BEAT_SESSIONS]],
            "published": len(self._published),
            "subscribed": self._subscribed,
        }

    async def run_beat(self) -> None:
        members = self.key("members")
        ttl_ms = int(self.settings.dead_after_seconds * 1000)
        while True:
            try:
                self.calls.labels("beat").inc(3)  # the beat, and the members' list and beats
                await self.client.pipeline(
                    [("SET", self.key("member", self.instance_id), orjson.dumps(self.beat()), "PX", ttl_ms), ("SADD", members, self.instance_id)]
                )
                self.last_beat = time.time()
                self._recovered()
                await self.reap()
            except Exception as exc:
                self._failed("beat", exc)
            await trio.sleep(self.settings.beat_seconds)

    async def members(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The beats of the live members, and the ids of the dead ones."""
        ids = sorted(i.decode() for i in await self.client.execute("SMEMBERS", self.key("members")))
        if not ids:
            return [], []
        beats = await self.client.execute("MGET", *[self.key("member", i) for i in ids])
        live, dead = [], []
        for member_id, beat in zip(ids, beats):
            if beat is None:
                dead.append(member_id)
            else:
                live.append(orjson.loads(beat))
        return live, dead

    async def alive(self, instance_id: str) -> bool:
        try:
            return bool(await self.client.execute("EXISTS", self.key("member", instance_id)))
        except Exception as exc:
            self._failed("alive", exc)
            return True  # not known to be dead

    async def reap(self) -> None:
        """Mark the live sessions of every dead member interrupted: one survivor
        does it, through the store, once."""
        _, dead = await self.members()
        for member_id in dead:
            if member_id == self.instance_id:
                continue  # our own beat expired while Redis was away: we are back
            claimed = await self.client.execute("SET", self.key("reaped", member_id), self.instance_id, "NX", "PX", 600_000)
            if claimed is None:
                continue
            store = self.runtime.store
            interrupt = getattr(store, "interrupt", None)
            ids: list[str] = []
            try:
                if interrupt is not None:
                    ids = await interrupt(member_id)
            except Exception as exc:
                # The store could not: let a later beat (here or elsewhere) try again.
                await self.client.execute("DEL", self.key("reaped", member_id))
                log.warning("cluster: could not mark the sessions of dead instance %s interrupted: %s", member_id, _describe(exc))
                continue
            await self.client.execute("SREM", self.key("members"), member_id)
            self.reaped_count.inc(len(ids))
            self.reaped.append({"instance": member_id, "at": time.time(), "sessions": len(ids), "store": interrupt is not None})
            del self.reaped[:-20]
            log.warning(
                "cluster: instance %s stopped beating; %d of its live sessions are marked interrupted%s",
                member_id,
                len(ids),
                "" if interrupt is not None else " (no store: nothing to mark)",
            )

    # -- commands ------------------------------------------------------------------------

    async def run_commands(self) -> None:
        channel = self.key("cmd", self.instance_id)
        backoff = 0.2
        async with trio.open_nursery() as handlers:
            while True:
                try:
                    async with self.client.connection() as conn:
                        with trio.fail_after(self.client.timeout):
                            await conn.execute("SUBSCRIBE", channel)
                        self._subscribed = True
                        self._subscription.set()
                        backoff = 0.2
                        await self._listen(conn, handlers)
                except Exception as exc:
                    self._subscribed = False
                    self._subscription = trio.Event()
                    self._failed("commands", exc)
                # At most a second between tries: an instance is deaf to stops
                # until it subscribes again, however long Redis was away.
                await trio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _listen(self, conn: Any, handlers: trio.Nursery) -> None:
        """Read commands and answers until the connection fails. A subscribed
        connection only ever receives, so a Redis that vanished without closing
        it (a partition) would go unnoticed: a PING every beat must bring its
        pong, or the connection is given up and made again."""
        last_seen = trio.current_time()
        every = self.settings.beat_seconds

        async def ping() -> None:
            while True:
                await trio.sleep(every)
                if trio.current_time() - last_seen > 2 * every + self.client.timeout:
                    raise ConnectionError(f"the subscribed connection brought nothing, not even a pong, for {2 * every + self.client.timeout:g} s")
                with trio.fail_after(self.client.timeout):
                    await conn.send("PING")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            while True:
                message = await conn.reply()
                last_seen = trio.current_time()
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    self._dispatch(message[2], handlers)

    def _dispatch(self, data: bytes, nursery: trio.Nursery) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        rid = message.get("rid")
        if "reply" in message:
            waiting = self._waiting.get(rid)
            if waiting is not None:
                waiting.reply = message["reply"]
                waiting.event.set()
            return
        if self._handlers >= MAX_HANDLERS:
            nursery.start_soon(self._answer, message, {"error": "the instance is busy"})
            return
        self._handlers += 1
        nursery.start_soon(self._handle, message)

    async def _handle(self, message: dict[str, Any]) -> None:
        try:
            try:
                reply = await self.execute(message.get("op"), message.get("sid", ""))
            except Exception as exc:
                log.exception("cluster: command %s failed", message.get("op"))
                reply = {"error": f"the command failed: {type(exc).__name__}"}
            await self._answer(message, reply)
        finally:
            self._handlers -= 1

    async def _answer(self, message: dict[str, Any], reply: dict[str, Any]) -> None:
        asker = message.get("from")
        if not isinstance(asker, str):
            return
        try:
            await self.client.execute("PUBLISH", self.key("cmd", asker), orjson.dumps({"rid": message.get("rid"), "reply": reply}))
        except Exception as exc:
            self._failed("answer", exc)

    async def execute(self, op: Any, session_id: str) -> dict[str, Any]:
        """Carry out a command about a session of this instance."""
        session = self.runtime.sessions.find(session_id)
        if session is None:
            return {"missing": True}
        if op == "get":
            return self._described(session)
        if op == "stop":
            stopped = session.cancel("stopped")
            if stopped:
                with trio.move_on_after(5):
                    await session.wait_done()
            body = session.to_json()
            body["stopped"] = stopped
            return {"session": body}
        if op == "delete":
            if session.cancel("stopped"):
                with trio.move_on_after(5):
                    await session.wait_done()
            if not session.finished:
                return {"deleted": False}
            return {"deleted": self.runtime.sessions.remove(session_id)}
        if op == "publish":
            if self._publish(session):
                return {"published": True}
            whole = not session.dropped_chunks
            why = "its first chunks are no longer in the memory of the instance running it" if not whole else "the cluster's Redis is away"
            return {"published": False, "whole": whole, "error": why}
        if op == "completion":
            deltas = None
            if session.dropped_chunks:
                store = self.runtime.store
                if store is None:
                    return {"error": f"Session '{session_id}' has finished and its chunks are no longer kept (no store is configured)."}
                deltas = []
                while True:
                    batch = await store.chunks(session_id, len(deltas), 500)
                    deltas.extend(batch)
                    if len(batch) < 500:
                        break
            return {"completion": completion_object(session, deltas)}
        return {"error": f"unknown command {op!r}"}

    def _described(self, session: Session) -> dict[str, Any]:
        return {
            "session": session.to_json(),
            "identity": session.identity,
            "team": session.team,
            "model": session.request.model,
            "created_at": session.created_at,
            "include_usage": session.request.include_usage,
            "published": session.id in self._published,
            # Whether its buffer still holds its first chunk (so it can be published).
            "whole": not session.dropped_chunks,
        }

    async def ask(self, owner: str, op: str, session_id: str) -> tuple[bool, dict[str, Any] | None]:
        """Send a command to instance `owner` and wait for its answer: (whether
        it was delivered, the answer or None when none came in time)."""
        if not self._subscribed:
            # Redis may have just come back, and the subscription with it.
            with trio.move_on_after(min(1.0, self.settings.command_timeout_seconds)):
                await self._subscription.wait()
        if not self._subscribed:
            raise APIError(
                "This instance cannot reach the others now (the cluster's Redis is away); try again, or reach the instance running the session.",
                status=503,
                type="server_error",
                code="cluster_unavailable",
            )
        if len(self._waiting) >= MAX_WAITING:
            raise APIError("Too many commands to other instances are waiting; retry shortly.", status=503, type="server_error", code="cluster_busy")
        rid = secrets.token_hex(8)
        waiting = self._waiting[rid] = _Waiting()
        try:
            message = orjson.dumps({"op": op, "sid": session_id, "rid": rid, "from": self.instance_id})
            try:
                self.calls.labels("command").inc()
                receivers = await self.client.execute("PUBLISH", self.key("cmd", owner), message)
            except Exception as exc:
                raise self.unavailable(exc) from None
            if not receivers:
                self.commands.labels(op, "undelivered").inc()
                return False, None
            with trio.move_on_after(self.settings.command_timeout_seconds):
                await waiting.event.wait()
            self.commands.labels(op, "answered" if waiting.reply is not None else "timeout").inc()
            return True, waiting.reply
        finally:
            del self._waiting[rid]

    # -- the directory, read (SessionDirectory) ------------------------------------------

    async def find(self, session_id: str) -> Remote | None:
        try:
            self.calls.labels("directory").inc()
            raw = await self.client.execute("GET", self.key("dir", session_id))
        except Exception as exc:
            self._failed("directory", exc)
            return None  # degraded: this instance's memory and the store only
        if raw is None:
            return None
        entry = orjson.loads(raw)
        owner = entry["o"]
        if owner == self.instance_id:
            return None  # ours, and no longer in memory: the store has it
        delivered, reply = await self.ask(owner, "get", session_id)
        if delivered:
            if reply is None:
                raise APIError(
                    f"The instance running session '{session_id}' did not answer within {self.settings.command_timeout_seconds:g} s; try again.",
                    status=504,
                    type="server_error",
                    code="instance_timeout",
                )
            if "session" not in reply:
                return None  # it no longer holds it: the store may
            return Remote(
                self, session_id, owner, reply["session"], reply["identity"], reply["team"], reply["model"], reply["created_at"],
                reply["include_usage"], published=reply["published"],
            )
        # Its instance is gone. What it published is left, with no end.
        try:
            if not await self.client.execute("EXISTS", self.key("chunks", session_id)):
                return None
        except Exception as exc:
            self._failed("directory", exc)
            return None
        if self.runtime.store is not None:
            stored = await self.runtime.store.get(session_id)
            if stored is not None and stored.finished:
                return None  # the store knows its end (interrupted, or before)
        info = {
            "id": session_id, "object": "session", "identity": entry["i"], "team": entry["t"], "model": entry["m"], "state": "interrupted",
            "created": int(entry["c"]), "background": entry["b"], "instance_alive": False,
        }
        return Remote(self, session_id, owner, info, entry["i"], entry["t"], entry["m"], entry["c"], entry["u"], published=True, orphan=True)

    # -- admin, health, status -----------------------------------------------------------

    async def cluster_view(self) -> Any:
        try:
            live, dead = await self.members()
        except Exception as exc:
            self._failed("admin", exc)
            raise APIError(f"The cluster's Redis does not answer: {_describe(exc)}", status=503, type="server_error", code="cluster_unavailable") from None
        now = time.time()
        for member in live:
            member["beat_age_seconds"] = round(now - member["beat_at"], 3)
            member["self"] = member["id"] == self.instance_id
        return json_response(
            {
                "object": "cluster",
                "instance": self.instance_id,
                "members": live,
                "dead": dead,
                "reaped": self.reaped,
                "beat_seconds": self.settings.beat_seconds,
                "dead_after_seconds": self.settings.dead_after_seconds,
            }
        )

    async def check(self) -> Health:
        if self._down_since is None and self._subscribed:
            return Health(True, {"redis": "ok", "instance": self.instance_id})
        detail = {
            "redis": "unreachable" if self._down_since is not None else "not subscribed yet",
            "since": self._down_since,
            "last_error": self._last_error or None,
            "degraded": "this instance serves its own sessions only: sessions on other instances cannot be read, followed or stopped from here,"
            " and its own cannot be reached from them; it rejoins when Redis answers",
        }
        # Still ready: sending it traffic is better than sending none.
        return Health(True, detail)

    def panel(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "subscribed": self._subscribed,
            "redis_down_since": self._down_since,
            "last_redis_error": self._last_error or None,
            "last_beat": self.last_beat,
            "published_sessions": len(self._published),
            "pending_directory_entries": len(self._entries),
            "dropped_directory_entries": self.dropped_entries,
            "unpublished_sessions": self.unpublished,
            "followed_streams": self.reader.watched,
            "commands_waiting": len(self._waiting),
            "reaped": self.reaped[-5:],
        }


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


_CLUSTER_OP = {
    "summary": "The instances of the cluster",
    "description": "Every live instance with its last beat (id, name, pid, live sessions), the dead ones not yet reaped, and the recent reaps.",
    "tags": ["admin"],
}
