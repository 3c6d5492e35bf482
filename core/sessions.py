"""Sessions: one chat completion each, run by a `SessionActor`, kept in a
`SessionRegistry`.

The actor runs in the runtime's nursery, not in the HTTP handler's task, so the
session outlives its connection when asked to (detached). It owns the provider
call and appends every visible delta to the session's buffer; subscribers follow
the buffer from their own offset and are woken on each append, so a slow
subscriber never blocks the actor. The buffer has a bound (`max_chunks`): a stream
that outgrows it fails rather than eating memory.

Stop and disconnect both cancel the session's cancel scope. Everything the actor
does after that is synchronous bookkeeping (record the partial usage, append the
final chunk, dispatch the event), so nothing needs to await inside a cancelled
scope. A finished session stays in the registry for its retention time, then the
janitor removes it: no task, no buffer, no entry is left behind.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable

import attrs
import trio

from .chat import ChatRequest, Delta, Usage
from .errors import APIError, InternalError, NotFound
from .events import EventDispatcher

log = logging.getLogger("streamvisor.sessions")

LIVE_STATES = frozenset({"pending", "running"})
#: The finish_reason of the last chunk of a stream that was stopped.
STOPPED = "stopped"


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@attrs.define(eq=False)
class Session:
    id: str
    request_id: str
    model: str
    provider: str
    request: ChatRequest
    identity: str = "anonymous"
    max_chunks: int = 100_000
    state: str = "pending"
    chunks: list[Delta] = attrs.field(factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    error: APIError | None = None
    detached: bool = False
    #: Response headers a plugin adds (e.g. X-Cache); set them before the first chunk.
    headers: dict[str, str] = attrs.field(factory=dict)
    #: Why the session was cancelled: "stopped", "disconnected" or "shutdown".
    cancel_reason: str | None = None
    created: float = attrs.field(factory=time.time)
    t0: float = attrs.field(factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Chunks dropped from the buffer by `release()` (`chunk_count` includes them).
    dropped_chunks: int = 0
    _released: bool = False
    #: Made by the first follower that waits, set and dropped by the next change:
    #: a chunk appended while nobody waits costs no Event.
    _changed: trio.Event | None = None
    _done: trio.Event = attrs.field(factory=trio.Event)

    # -- state -----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state not in LIVE_STATES

    @property
    def chunk_count(self) -> int:
        """Chunks the session produced, including any dropped by `release()`."""
        return self.dropped_chunks + len(self.chunks)

    def append(self, delta: Delta) -> None:
        self.chunks.append(delta)
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def finish(self, state: str) -> None:
        self.state = state
        self.finished_at = time.perf_counter()
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()
        self._done.set()
        if self._released:
            self._drop_chunks()

    def release(self) -> None:
        """The opener is done with the buffer: its response is sent, or its client
        is gone. Once the session has finished, its chunks are dropped and only
        their count is kept, so that a retained finished session is a handful of
        objects instead of one per chunk: with thousands retained, the garbage
        collector's full collections walked every one of them (a fifth of the
        server's time at 900 streams/s). A detached session keeps its buffer."""
        if self.detached:
            return
        self._released = True
        if self.finished:
            self._drop_chunks()

    def _drop_chunks(self) -> None:
        self.dropped_chunks += len(self.chunks)
        self.chunks = []

    async def _wait_change(self) -> None:
        changed = self._changed
        if changed is None:
            changed = self._changed = trio.Event()
        await changed.wait()

    def cancel(self, reason: str) -> bool:
        """Cancel a live session; `reason` becomes its final state. Idempotent."""
        if self.finished or self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        self.scope.cancel()
        return True

    # -- following -------------------------------------------------------------

    async def follow(self, offset: int = 0) -> AsyncIterator[list[Delta]]:
        """Yield the buffer from `offset` on, in batches of whatever is ready,
        until the session has finished and everything was yielded."""
        while True:
            end = len(self.chunks)
            if offset < end:
                batch = self.chunks[offset:end]
                offset = end
                yield batch
            elif self.finished:
                return
            else:
                await self._wait_change()

    async def wait_first(self) -> None:
        """Wait until the first chunk is buffered or the session has finished."""
        while not self.chunks and not self.finished:
            await self._wait_change()

    async def wait_done(self) -> None:
        await self._done.wait()

    # -- views -----------------------------------------------------------------

    def _ms(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.t0) * 1000, 3)

    def timings(self) -> dict[str, float | None]:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return {
            "started_ms": self._ms(self.started_at),
            "first_token_ms": self._ms(self.first_token_at),
            "finished_ms": self._ms(self.finished_at),
            "duration_ms": round((end - self.t0) * 1000, 3),
        }

    def to_json(self) -> dict[str, Any]:
        usage = self.usage or Usage(exact=False)
        return {
            "id": self.id,
            "object": "session",
            "request_id": self.request_id,
            "identity": self.identity,
            "model": self.model,
            "provider": self.provider,
            "state": self.state,
            "finish_reason": self.finish_reason,
            "detached": self.detached,
            "created": int(self.created),
            "chunks": self.chunk_count,
            "timings": self.timings(),
            "usage": usage.to_json(),
            "error": None if self.error is None else {"message": self.error.message, "type": self.error.type, "code": self.error.code},
        }


StreamFn = Callable[[ChatRequest], AsyncIterator[Delta]]
Transformer = Callable[[Delta, Session], "Delta | None"]


def unwrap(exc: BaseException) -> BaseException:
    """The one meaningful exception inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class SessionActor:
    """Runs one session: the provider call, the buffer, the outcome."""

    def __init__(
        self,
        session: Session,
        stream: StreamFn,
        request: ChatRequest,
        transformers: list[Transformer],
        events: EventDispatcher,
        registry: "SessionRegistry",
    ) -> None:
        self.session = session
        self.stream = stream
        self.request = request
        self.transformers = transformers
        self.events = events
        self.registry = registry
        self.completed = False

    async def run(self) -> None:
        session = self.session
        try:
            with session.scope:
                session.state = "running"
                session.started_at = time.perf_counter()
                self.events.emit("started", session)
                await self._relay()
                self.completed = True
        except Exception as exc:
            self._fail(unwrap(exc))
        finally:
            self._conclude()

    async def _relay(self) -> None:
        session, events, transformers = self.session, self.events, self.transformers
        # Listeners are registered at start-up: ask once per session, not per chunk.
        chunk_events = events.wants("chunk")
        stream = self.stream(self.request)
        try:
            async for delta in stream:
                usage = delta.usage
                for transform in transformers:
                    delta = transform(delta, session)
                    if delta is None:
                        break
                else:
                    # A transformer may restate the usage (e.g. count reasoning tokens).
                    if delta.usage is not None:
                        usage = delta.usage
                if usage is not None:
                    session.usage = usage
                if delta is None or not (delta.content or delta.finish_reason or delta.visible):
                    continue
                if delta.finish_reason is not None:
                    session.finish_reason = delta.finish_reason
                if not session.chunks:
                    session.first_token_at = time.perf_counter()
                    if delta.role is None:
                        delta = attrs.evolve(delta, role="assistant")
                    events.emit("first_token", session)
                if len(session.chunks) >= session.max_chunks:
                    raise InternalError(f"the stream exceeded the session buffer bound of {session.max_chunks} chunks")
                session.append(delta)
                if chunk_events:
                    events.emit("chunk", session, index=len(session.chunks) - 1)
        finally:
            # Close the provider's generator here, in this task, so that an
            # upstream request is closed the moment the session is cancelled.
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _fail(self, exc: BaseException) -> None:
        session = self.session
        if isinstance(exc, APIError):
            session.error = exc
            log.warning("session %s failed: %s", session.id, exc.message)
        else:
            session.error = InternalError("The stream failed unexpectedly.")
            log.error("session %s failed", session.id, exc_info=exc)

    def _conclude(self) -> None:
        """Record the outcome. Synchronous on purpose: it runs after cancellation."""
        session = self.session
        if session.usage is None:
            # The provider gave no counts (it failed or was cut off before its
            # usage chunk): estimate them rather than record zero.
            text = sum(len(d.content or "") + len(d.reasoning or "") for d in session.chunks)
            session.usage = Usage(session.request.estimate_prompt_tokens(), (text + 3) // 4, exact=False)
        if session.error is not None:
            state = "failed"
        elif not self.completed:
            # Cancelled: by stop or disconnect (cancel_reason says which), or by
            # the runtime's own shutdown.
            state = session.cancel_reason or "shutdown"
            session.finish_reason = STOPPED
            session.append(Delta(finish_reason=STOPPED))
        else:
            state = "completed"
            if session.finish_reason is None:
                session.finish_reason = "stop"
                session.append(Delta(finish_reason="stop"))
        session.finish(state)
        self.registry.retire(session)
        kind = "stopped" if state == "shutdown" else state
        if self.events.wants(kind):
            usage = session.usage
            timings = session.timings()
            self.events.emit(
                kind,
                session,
                reason=session.cancel_reason,
                finish_reason=session.finish_reason,
                usage=usage.to_json(),
                error=None if session.error is None else session.error.message,
                error_type=None if session.error is None else session.error.code,
                chunks=session.chunk_count,
                first_token_ms=timings["first_token_ms"],
                duration_ms=timings["duration_ms"],
            )


class SessionRegistry:
    """The live and recently finished sessions, by id, with bounded retention."""

    def __init__(self, retention: float = 60.0, max_retained: int = 10_000) -> None:
        self.retention = retention
        #: Finished sessions kept at most, whatever their age: retention is in
        #: seconds, and at a high request rate seconds can hold many buffers.
        self.max_retained = max_retained
        self.sessions: dict[str, Session] = {}
        self._expiry: collections.deque[tuple[float, str]] = collections.deque()
        self.live = 0

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.live += 1

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"No session with id '{session_id}' (it never existed or its retention time has passed).")
        return session

    def retire(self, session: Session) -> None:
        """Called once when `session` finishes: start its retention clock."""
        self.live -= 1
        if self.retention <= 0:
            self.sessions.pop(session.id, None)
        else:
            self._expiry.append((time.monotonic() + self.retention, session.id))
            while len(self._expiry) > self.max_retained:
                _, oldest = self._expiry.popleft()
                self.sessions.pop(oldest, None)

    def reap(self, now: float | None = None) -> int:
        """Remove the finished sessions whose retention time has passed."""
        now = time.monotonic() if now is None else now
        removed = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, session_id = self._expiry.popleft()
            if self.sessions.pop(session_id, None) is not None:
                removed += 1
        return removed

    async def janitor(self) -> None:
        """A service actor: reap expired sessions about ten times per retention time."""
        interval = min(1.0, max(0.05, self.retention / 10))
        while True:
            await trio.sleep(interval)
            self.reap()
