"""Sessions: one chat completion each, run by a `SessionActor`, kept in a
`SessionRegistry`.

The actor runs in the runtime's nursery, not in the HTTP handler's task. It owns
the provider call (through the middleware chain) and appends every visible
delta to the session's buffer; subscribers follow the buffer from their own
offset and are woken on each append, so a slow subscriber never blocks the
actor. The buffer has a bound (`max_chunks`): a stream that outgrows it fails
rather than eating memory.

Stop and disconnect both cancel the session's cancel scope. Everything the actor
does after that is synchronous bookkeeping (record the partial usage, append the
final chunk, dispatch the terminal event), so nothing needs to await inside a
cancelled scope. A finished session stays in the registry for its retention
time, then the janitor removes it: no task, no buffer, no entry is left behind.

Clocks: `created_at` is wall-clock time (seconds since the epoch, for people and
records); every field ending in `_mono` is `time.perf_counter()` (for durations;
comparable only within one process).
"""

from __future__ import annotations

import collections
import inspect
import logging
import re
import secrets
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import attrs
import trio

from .chat import ChatRequest, Delta, Usage
from .errors import APIError, InternalError, NotFound
from .events import TERMINAL_TYPES, EventDispatcher, Outcome
from .faults import PluginFaults
from .logs import session_id_var

log = logging.getLogger("streamvisor.sessions")

LIVE_STATES = frozenset({"pending", "running"})
#: The state of a stored session whose server died while it was live.
INTERRUPTED = "interrupted"
#: Every state a session can be in, in the order of its life.
STATES = ("pending", "running", "completed", "failed", "stopped", "disconnected", "shutdown", INTERRUPTED)
#: The finish_reason of the last chunk of a stream that was stopped.
STOPPED = "stopped"

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]{0,4096}$")
#: Headers the core sets itself (or the server frames the response with).
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "transfer-encoding", "connection", "x-session-id", "x-request-id", "server-timing", "cache-control"}
)


#: What one buffered delta is counted as besides its text (the objects around it).
_DELTA_OVERHEAD = 200
#: The actor adds a session's bytes to the meter in steps of about this many, not
#: per chunk: the meter may lag each live session by up to one step.
_COUNT_STEP = 4096


class BufferMeter:
    """The bytes held by every session buffer of a runtime together, counted as
    deltas are appended and given back when a buffer is dropped. An estimate
    (text length plus a fixed overhead per delta), cheap enough for every chunk;
    the runtime refuses new sessions while it is over `max_buffered_bytes`."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


#: Headers checked already: plugins set the same few on every request (X-Cache:
#: bypass), and two regular expressions per call showed. Bounded: cleared when full.
_ACCEPTED_HEADERS: set[tuple[str, str]] = set()


def check_header(name: str, value: str) -> None:
    """Refuse a header a plugin may not set: a reserved name, or a name or value
    that could split the response (CR, LF and other control characters)."""
    if type(name) is str and type(value) is str and (name, value) in _ACCEPTED_HEADERS:
        return
    # fullmatch: `$` would let a trailing newline through.
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"not a valid header name: {name!r}")
    if name.lower() in _RESERVED_HEADERS:
        raise ValueError(f"the header {name} is set by streamvisor itself")
    if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
        raise ValueError(f"the value of header {name} must be printable ASCII without line breaks, at most 4096 characters")
    if len(_ACCEPTED_HEADERS) >= 1024:
        _ACCEPTED_HEADERS.clear()
    _ACCEPTED_HEADERS.add((name, value))


@attrs.define(eq=False)
class Session:
    """One chat completion. Plugins read its fields and call `set_header`,
    `emit` and `cancel`; everything else belongs to the runtime."""

    id: str
    request_id: str
    #: The model name the client asked for, and the provider serving it.
    model: str
    provider: str
    #: The client's request, as validated.
    request: ChatRequest
    identity: str = "anonymous"
    #: The caller's team, when its key belongs to one.
    team: str | None = None
    #: The id of the API key the session was made with, or None.
    key_id: str | None = None
    max_chunks: int = 100_000
    #: Started with `background: true`: it outlives its HTTP request, and keeps
    #: its buffer (for followers) until its retention ends.
    background: bool = False
    #: pending, running, then completed, failed, stopped, disconnected or shutdown.
    state: str = "pending"
    #: The buffered deltas. Read it; only the runtime appends. Emptied (their
    #: count kept in `dropped_chunks`) once the session is finished and served.
    chunks: list[Delta] = attrs.field(factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    error: APIError | None = None
    #: Why the session was cancelled: "stopped", "disconnected" or "shutdown".
    cancel_reason: str | None = None
    #: Wall-clock time of creation (seconds since the epoch).
    created_at: float = attrs.field(factory=time.time)
    #: `time.perf_counter()` at creation, start, first chunk and end.
    created_mono: float = attrs.field(factory=time.perf_counter)
    started_mono: float | None = None
    first_token_mono: float | None = None
    finished_mono: float | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Chunks dropped from the buffer by `release()` (`chunk_count` includes them).
    dropped_chunks: int = 0
    _headers: dict[str, str] = attrs.field(factory=dict)
    _events: EventDispatcher | None = None
    _meter: BufferMeter | None = None
    #: The bytes this session's buffer is counted as in the meter.
    _buffered: int = 0
    _released: bool = False
    #: Holders of the buffer (`hold()`): while any, release does not drop it.
    _holds: int = 0
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

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers plugins set (a copy)."""
        return dict(self._headers)

    # -- what plugins may do ---------------------------------------------------

    def set_header(self, name: str, value: str) -> bool:
        """Add a response header (e.g. X-Cache). Headers leave with the first
        chunk: returns False, and changes nothing, once a chunk is buffered or
        the session has finished. Raises ValueError for a reserved header or a
        name or value that could split the response."""
        check_header(name, value)
        if self.chunks or self.dropped_chunks or self.finished:
            return False
        self._headers[name] = value
        return True

    def emit(self, type: str, **data: Any) -> None:
        """Dispatch an event of this session to the listeners of `type` (a type
        declared with `register_event_types`; terminal types are core's own)."""
        events = self._events
        if events is None:
            return
        if type in TERMINAL_TYPES:
            raise ValueError(f"{type!r} is a terminal event: only the runtime dispatches it")
        events.emit(type, self, **data)

    def cancel(self, reason: str) -> bool:
        """Cancel a live session; `reason` ("stopped", "disconnected",
        "shutdown") becomes its final state. Returns False when it was finished
        or cancelled already."""
        if self.finished or self.cancel_reason is not None:
            return False
        self.cancel_reason = reason
        self.scope.cancel()
        return True

    def hold(self) -> None:
        """Keep the buffer after the session has finished and its opener is done
        with it, until `unhold()`: for a plugin that reads the chunks later than
        the client (a store writing them in batches). Every hold needs its
        unhold; the buffer meter keeps counting a held buffer."""
        self._holds += 1

    def unhold(self) -> None:
        """Let go of a `hold()`: the buffer is dropped now if nobody else needs it."""
        if self._holds <= 0:
            raise ValueError(f"session {self.id}: unhold() without hold()")
        self._holds -= 1
        if not self._holds and self._released and self.finished:
            self._drop_chunks()

    # -- the runtime's side ----------------------------------------------------

    def append(self, delta: Delta) -> None:
        """Buffer `delta` (the actor counts its bytes in the meter, see `_count`)."""
        self.chunks.append(delta)
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def finish(self, state: str) -> None:
        self.state = state
        self.finished_mono = time.perf_counter()
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()
        self._done.set()
        if self._released and not self._holds:
            self._drop_chunks()

    def release(self) -> None:
        """The opener is done with the buffer: its response is sent, or its client
        is gone. Once the session has finished, its chunks are dropped and only
        their count is kept, so that a retained finished session is a handful of
        objects instead of one per chunk: with thousands retained, the garbage
        collector's full collections walked every one of them (a fifth of the
        server's time at 900 streams/s)."""
        self._released = True
        if self.finished and not self._holds:
            self._drop_chunks()

    def _drop_chunks(self) -> None:
        self.dropped_chunks += len(self.chunks)
        self.chunks = []
        self._unmeter()

    def _count(self, size: int) -> None:
        """Count `size` more bytes of this buffer in the runtime's meter."""
        meter = self._meter
        if meter is not None:
            self._buffered += size
            meter.bytes += size

    def _unmeter(self) -> None:
        """Stop counting this buffer in the runtime's meter: it was dropped, or
        the session left the registry (its opener may still be reading it)."""
        if self._meter is not None:
            self._meter.bytes -= self._buffered
            self._buffered = 0

    async def _wait_change(self) -> None:
        changed = self._changed
        if changed is None:
            changed = self._changed = trio.Event()
        await changed.wait()

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
        return None if at is None else round((at - self.created_mono) * 1000, 3)

    def timings(self) -> dict[str, float | None]:
        """Milliseconds from creation to start, first chunk and end, and the
        duration so far (to now, while live)."""
        end = self.finished_mono if self.finished_mono is not None else time.perf_counter()
        return {
            "started_ms": self._ms(self.started_mono),
            "first_token_ms": self._ms(self.first_token_mono),
            "finished_ms": self._ms(self.finished_mono),
            "duration_ms": round((end - self.created_mono) * 1000, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return session_object(
            self.id,
            self.request_id,
            self.identity,
            self.model,
            self.provider,
            self.state,
            self.finish_reason,
            self.created_at,
            self.chunk_count,
            self.timings(),
            self.usage,
            None if self.error is None else self.error.summary(),
            self.background,
            self.team,
            self.key_id,
        )


def session_object(
    session_id: str,
    request_id: str,
    identity: str,
    model: str,
    provider: str,
    state: str,
    finish_reason: str | None,
    created_at: float,
    chunks: int,
    timings: Mapping[str, float | None],
    usage: Usage | None,
    error: Mapping[str, Any] | None,
    background: bool,
    team: str | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """The session object of the API (`GET /v1/sessions/{id}`), for a session in
    memory and for a stored one alike."""
    return {
        "id": session_id,
        "object": "session",
        "request_id": request_id,
        "identity": identity,
        "team": team,
        "key_id": key_id,
        "model": model,
        "provider": provider,
        "state": state,
        "finish_reason": finish_reason,
        "created": int(created_at),
        "chunks": chunks,
        "timings": dict(timings),
        "usage": (usage or Usage(exact=False)).to_json(),
        "error": None if error is None else dict(error),
        "background": background,
    }


StreamFn = Callable[[ChatRequest], AsyncIterator[Delta]]
#: A per-session transform: `transform(delta)` returns the delta to keep or None.
Transform = Callable[[Delta], "Delta | None"]
#: What `register_chunk_transformers` registers: called once per session.
TransformerFactory = Callable[[Session], "Transform | None"]


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
        factories: list[tuple[str, TransformerFactory]],
        events: EventDispatcher,
        registry: "SessionRegistry",
        faults: PluginFaults,
        blame: Callable[[BaseException], str | None] = lambda exc: None,
        price: Callable[[str, Usage, Session], float | None] | None = None,
    ) -> None:
        self.session = session
        self.price = price
        self.stream = stream
        self.factories = factories
        self.events = events
        self.registry = registry
        self.faults = faults
        self.blame = blame
        self.completed = False

    async def run(self) -> None:
        session = self.session
        # This task's own context (a copy of its opener's, with the request id):
        # what the actor, the middleware and the provider log carries the session.
        session_id_var.set(session.id)
        try:
            with session.scope:
                session.state = "running"
                session.started_mono = time.perf_counter()
                self.events.emit("started", session)
                await self._relay()
                self.completed = True
        except Exception as exc:
            self._fail(unwrap(exc))
        finally:
            self._conclude()

    def _transforms(self) -> tuple[list[Transform], list[str]]:
        """This session's transformers, made by each plugin's factory."""
        transforms: list[Transform] = []
        owners: list[str] = []
        for plugin, factory in self.factories:
            try:
                transform = factory(self.session)
            except Exception as exc:
                self.faults.record(plugin, "chunk transformer factory", exc)
                continue
            if transform is not None:
                transforms.append(transform)
                owners.append(plugin)
        return transforms, owners

    async def _relay(self) -> None:
        session, events = self.session, self.events
        transforms, owners = self._transforms() if self.factories else ([], [])
        # Listeners are registered at start-up: ask once per session, not per chunk.
        chunk_events = events.wants("chunk")
        stream = self.stream(session.request)
        # The buffer is only ever appended to while the session runs.
        chunks, max_chunks = session.chunks, session.max_chunks
        uncounted = 0
        try:
            async for delta in stream:
                usage = delta.usage
                if transforms:
                    # Inline, one call per transformer and chunk: this runs for
                    # every chunk of every session.
                    faulty = None
                    for transform in transforms:
                        try:
                            result = transform(delta)
                        except APIError:
                            raise  # a transformer's deliberate verdict (a guardrail): the session fails
                        except Exception as exc:
                            faulty = self._contain(transform, exc, None, transforms, owners, faulty)
                            continue  # the delta goes on as it was
                        if type(result) is not Delta:
                            if result is None:
                                delta = None
                                break
                            faulty = self._contain(transform, TypeError(f"a chunk transformer returned {type(result).__name__}, not a Delta or None"), result, transforms, owners, faulty)
                            continue
                        delta = result
                    if faulty:
                        for transform in faulty:
                            index = transforms.index(transform)
                            del transforms[index], owners[index]
                    if delta is None:
                        if usage is not None:
                            session.usage = usage
                        continue
                    # A transformer may restate the usage (e.g. count reasoning tokens).
                    if delta.usage is not None:
                        usage = delta.usage
                if usage is not None:
                    session.usage = usage
                content, finish = delta.content, delta.finish_reason
                if not (content or finish or delta.visible):
                    continue
                if finish is not None:
                    session.finish_reason = finish
                if not chunks:
                    session.first_token_mono = time.perf_counter()
                    if delta.role is None:
                        delta = attrs.evolve(delta, role="assistant")
                    events.emit("first_token", session)
                if len(chunks) >= max_chunks:
                    raise InternalError(f"the stream exceeded the session buffer bound of {max_chunks} chunks")
                session.append(delta)
                # What the buffer meter counts: the text, plus the objects around
                # it; added in steps, not per chunk (see _COUNT_STEP).
                uncounted += _DELTA_OVERHEAD + len(content) if content else _DELTA_OVERHEAD
                if delta.reasoning:
                    uncounted += len(delta.reasoning)
                if uncounted >= _COUNT_STEP:
                    session._count(uncounted)
                    uncounted = 0
                if chunk_events:
                    events.emit("chunk", session, index=len(chunks) - 1)
        finally:
            session._count(uncounted)
            # Close the chain's generator here, in this task, so that an
            # upstream request is closed the moment the session is cancelled.
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def _contain(
        self, transform: Transform, exc: Exception, result: Any, transforms: list[Transform], owners: list[str], faulty: list[Transform] | None
    ) -> list[Transform]:
        """A transformer raised (a bug) or returned garbage: count the fault
        against its plugin; it leaves this session after this chunk (the
        caller removes it), and the delta goes on as it was."""
        if inspect.iscoroutine(result):
            result.close()  # an async transform's coroutine: never to be awaited
        self.faults.record(owners[transforms.index(transform)], "chunk transformer", exc)
        return [transform] if faulty is None else [*faulty, transform]

    def _fail(self, exc: BaseException) -> None:
        session = self.session
        if isinstance(exc, APIError):
            log.warning("session %s failed: %s", session.id, exc.message)
            # The error is kept with the session for its retention; its traceback
            # and chained causes hold the frames of the provider that raised it
            # (a decoder's buffers, a response): a failed session keeps no more
            # than its own output.
            exc.__traceback__ = exc.__cause__ = exc.__context__ = None
            session.error = exc
        else:
            # A bug: in a plugin's middleware or provider when its code raised it
            # (a fault of that plugin), else in the runtime.
            plugin = self.blame(exc)
            if plugin is not None:
                self.faults.record(plugin, "stream", exc)
            else:
                log.error("session %s failed", session.id, exc_info=exc)
            session.error = InternalError("The stream failed unexpectedly.")

    def _conclude(self) -> None:
        """Record the outcome. Synchronous on purpose: it runs after cancellation."""
        session = self.session
        if session.usage is None:
            # The provider gave no counts (it failed or was cut off before its
            # usage chunk): estimate them rather than record zero.
            try:
                text = sum(len(d.content or "") + len(d.reasoning or "") for d in session.chunks)
                session.usage = Usage(session.request.estimate_prompt_tokens(), (text + 3) // 4, exact=False)
            except Exception:
                # A delta or a request of the wrong types (a plugin's garbage): an
                # exception here would escape the actor and stop the whole server.
                log.exception("session %s: its usage could not be estimated", session.id)
                session.usage = Usage(0, 0, exact=False)
        if self.price is not None and session.usage.cost_usd is None:
            if session.error is not None and not session.chunks and not session.usage.exact:
                # Failed before anything was produced, and no upstream counted
                # a token: nothing to charge.
                session.usage = attrs.evolve(session.usage, cost_usd=0.0)
            else:
                # What it produced, stopped or not, at the price table's rates
                # (runtime.price contains a price function's failure).
                session.usage = attrs.evolve(session.usage, cost_usd=self.price(session.model, session.usage, session))
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
            timings = session.timings()
            error = session.error
            outcome = Outcome(
                state=kind,
                reason=session.cancel_reason,
                finish_reason=session.finish_reason,
                usage=session.usage,
                chunks=session.chunk_count,
                first_token_ms=timings["first_token_ms"],
                duration_ms=timings["duration_ms"] or 0.0,
                error=None if error is None else error.message,
                error_code=None if error is None else error.code,
            )
            self.events.emit(kind, session, outcome)


class SessionRegistry:
    """The live and recently finished sessions, by id, with bounded retention.

    Live sessions are kept until they finish; finished ones for `retention`
    seconds and at most `max_retained` of them (the oldest go first). Plugins
    use `get`, `find`, `live`, `retained`, `remove` and the counts; the runtime
    adds and retires sessions.
    """

    def __init__(self, retention: float = 60.0, max_retained: int = 10_000) -> None:
        self.retention = retention
        #: Finished sessions kept at most, whatever their age: retention is in
        #: seconds, and at a high request rate seconds can hold many buffers.
        self.max_retained = max_retained
        self._live: dict[str, Session] = {}
        #: Live background sessions per identity.
        self._background: dict[str, int] = {}
        #: The runtime's buffer meter (set by the runtime).
        self.meter: BufferMeter | None = None
        #: Finished sessions in the order they finished, which is also the order
        #: they expire in (retention is one number): (expiry, session).
        self._retained: collections.OrderedDict[str, tuple[float, Session]] = collections.OrderedDict()

    # -- lookups -----------------------------------------------------------------

    def find(self, session_id: str) -> Session | None:
        """The session with this id, live or retained, or None."""
        session = self._live.get(session_id)
        if session is not None:
            return session
        kept = self._retained.get(session_id)
        return None if kept is None else kept[1]

    def get(self, session_id: str) -> Session:
        """The session with this id; `NotFound` (a 404 for a route) when there is none."""
        session = self.find(session_id)
        if session is None:
            raise NotFound(f"No session with id '{session_id}' (it never existed or its retention time has passed).")
        return session

    def live(self) -> list[Session]:
        """The live sessions, oldest first (a snapshot)."""
        return list(self._live.values())

    def retained(self) -> list[Session]:
        """The finished sessions still kept, in the order they finished (a snapshot)."""
        return [session for _, session in self._retained.values()]

    def __iter__(self) -> Iterator[Session]:
        """Every session, live ones first (over a snapshot)."""
        return iter(self.live() + self.retained())

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def retained_count(self) -> int:
        return len(self._retained)

    def __len__(self) -> int:
        return len(self._live) + len(self._retained)

    def remove(self, session_id: str) -> bool:
        """Forget a finished session before its retention ends. Returns whether
        it was kept. A live session cannot be removed: cancel it first."""
        if session_id in self._live:
            raise ValueError(f"session {session_id} is live; cancel it before removing it")
        kept = self._retained.pop(session_id, None)
        if kept is None:
            return False
        kept[1]._unmeter()
        return True

    # -- the runtime's side ------------------------------------------------------

    def live_background(self, identity: str) -> int:
        """How many background sessions of `identity` are live."""
        return self._background.get(identity, 0)

    def add(self, session: Session) -> None:
        self._live[session.id] = session
        if session.background:
            self._background[session.identity] = self._background.get(session.identity, 0) + 1

    def retire(self, session: Session) -> None:
        """Called once when `session` finishes: start its retention clock."""
        if self._live.pop(session.id, None) is not None and session.background:
            left = self._background.get(session.identity, 0) - 1
            if left > 0:
                self._background[session.identity] = left
            else:
                self._background.pop(session.identity, None)
        if self.retention <= 0:
            session._unmeter()
            return
        self._retained[session.id] = (time.monotonic() + self.retention, session)
        while len(self._retained) > self.max_retained:
            self._retained.popitem(last=False)[1][1]._unmeter()

    def reap(self, now: float | None = None) -> int:
        """Remove the finished sessions whose retention time has passed."""
        now = time.monotonic() if now is None else now
        removed = 0
        retained = self._retained
        while retained:
            session_id, (expiry, session) = next(iter(retained.items()))
            if expiry > now:
                break
            del retained[session_id]
            session._unmeter()
            removed += 1
        return removed

    async def janitor(self) -> None:
        """A service actor: reap expired sessions about ten times per retention time."""
        interval = min(1.0, max(0.05, self.retention / 10))
        while True:
            await trio.sleep(interval)
            self.reap()
