"""Session events: their types, their objects, and their delivery to listeners.

Core declares the session life cycle (`created`, `started`, `first_token`,
`chunk` and the four terminal types); plugins declare their own types with the
`register_event_types` hook, and emitting a type nobody declared is an error.

Delivery never changes or delays a stream: each `on_event` implementation is a
listener with its own queue and its own supervised task, and the stream's task
only appends to the queues. The queues treat the two kinds of event apart:

- **Terminal events** (`completed`, `failed`, `stopped`, `disconnected`) are
  never dropped: they carry a session's usage, and usage must not be lost. Each
  session has exactly one, so a listener's backlog of them is bounded by
  sessions; the runtime counts that backlog against `[server]
  max_live_sessions` and refuses new sessions (503 `overloaded`) while a
  listener is that far behind, instead of growing without bound.
- **Every other event** is dropped, and counted, when the listener already has
  `[server] event_queue_size` of them queued.

Both kinds share one queue, so a listener sees a session's events in the order
they happened. A listener call that raises is logged and counted; an async
listener call that takes longer than `[server] listener_timeout_seconds` is
cancelled and counted, so one hung call cannot stop delivery.
"""

from __future__ import annotations

import collections
import inspect
import logging
import re
import time
from typing import Any, Callable, Iterable, Mapping

import attrs
import trio

from .chat import Usage

log = logging.getLogger("streamvisor.events")

#: The event types that end a session; each session dispatches exactly one.
TERMINAL_TYPES = frozenset({"completed", "failed", "stopped", "disconnected"})

#: The session life cycle, declared by core, in the order a session goes through it.
CORE_TYPES: dict[str, str] = {
    "created": "the session is registered, before its task runs",
    "started": "its task starts, before the provider is called",
    "first_token": "the first delta is about to be buffered",
    "chunk": "a delta was added to the session's buffer (data: index)",
    "completed": "the provider's stream ended normally",
    "failed": "the provider, a middleware or a transformer failed the stream",
    "stopped": "stopped by POST /v1/sessions/{id}/stop or by the runtime's shutdown",
    "disconnected": "the client went away before the session finished",
}

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
#: A listener working through a backlog yields to the scheduler this often.
_CHECKPOINT_EVERY = 64


@attrs.frozen(slots=True)
class EventType:
    name: str
    #: "core", or the name of the plugin that declared it.
    owner: str
    description: str = ""
    terminal: bool = False


@attrs.frozen(slots=True)
class Outcome:
    """How a session ended: carried by its terminal event."""

    #: completed, failed, stopped or disconnected (the event's type).
    state: str
    #: Why it was cancelled: "stopped", "disconnected" or "shutdown"; None when it was not.
    reason: str | None
    finish_reason: str | None
    #: The session's usage; estimated (`exact=False`) when the provider gave none.
    usage: Usage
    #: Buffered chunks, including the final one the runtime appends.
    chunks: int
    #: From the session's creation to its first chunk, and to its end.
    first_token_ms: float | None
    duration_ms: float
    #: The error a failed session ended with: its message and code.
    error: str | None = None
    error_code: str | None = None


@attrs.frozen(slots=True)
class Event:
    type: str
    session_id: str
    request_id: str
    model: str
    provider: str
    #: Wall-clock time of the event (seconds since the epoch).
    at: float
    #: What the event type says about itself; `{}` for most core types.
    data: Mapping[str, Any] = attrs.field(factory=dict)
    #: Who asked: the API key's identity, "anonymous" when nothing authenticates.
    identity: str = "anonymous"
    #: Set on terminal events only.
    outcome: Outcome | None = None
    #: The caller's team, when its key belongs to one (contract 1.2).
    team: str | None = None
    #: The id of the API key the session was made with, or None (contract 1.2).
    key_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    @property
    def usage(self) -> Usage | None:
        """The session's usage, on a terminal event; None on the others."""
        return None if self.outcome is None else self.outcome.usage


@attrs.define(eq=False)
class ListenerStats:
    plugin: str
    delivered: int = 0
    errors: int = 0
    #: Calls cancelled after `listener_timeout_seconds` (also counted in `errors`).
    timeouts: int = 0
    #: Non-terminal events dropped because the listener's queue was full.
    dropped: int = 0
    #: Events waiting now, and how many of them are terminal.
    queued: int = 0
    terminal_queued: int = 0


@attrs.define(eq=False)
class _Listener:
    plugin: str
    function: Callable[[Event], Any]
    types: frozenset[str]
    stats: ListenerStats
    queue: collections.deque[Event] = attrs.field(factory=collections.deque)
    #: Non-terminal events in `queue` (the ones the bound applies to).
    droppable: int = 0
    #: Set by the delivering task while it waits for an event.
    waiting: trio.Event | None = None


class EventDispatcher:
    """The registry of event types, and the fan-out of events to listeners, each
    receiving only the types it listens to (all unless its `on_event` was
    decorated with `listens_to`)."""

    def __init__(self, queue_size: int = 1024, listener_timeout: float = 30.0) -> None:
        self.queue_size = queue_size
        self.listener_timeout = listener_timeout
        self._types: dict[str, EventType] = {
            name: EventType(name, "core", description, name in TERMINAL_TYPES) for name, description in CORE_TYPES.items()
        }
        self._listeners: list[_Listener] = []
        self._by_type: dict[str, list[_Listener]] = {}

    # -- types ---------------------------------------------------------------

    def declare(self, owner: str, name: str, description: str = "") -> None:
        """Declare an event type for plugin `owner` (the `register` of the
        `register_event_types` hook)."""
        if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
            raise ValueError(f"an event type name is 1 to 64 lower-case letters, digits, '_' or '.', starting with a letter; got {name!r}")
        known = self._types.get(name)
        if known is not None:
            raise ValueError(f"event type {name!r} is already declared by {'core' if known.owner == 'core' else 'plugin ' + repr(known.owner)}")
        self._types[name] = EventType(name, owner, description)

    @property
    def types(self) -> dict[str, EventType]:
        """Every declared event type by name: core's first, then the plugins'."""
        return dict(self._types)

    # -- listeners -------------------------------------------------------------

    def add_listener(self, plugin: str, function: Callable[[Event], Any], types: Iterable[str] | None = None) -> None:
        wanted = frozenset(self._types) if types is None else frozenset(types)
        unknown = wanted - set(self._types)
        if unknown:
            raise ValueError(
                f"plugin {plugin!r} listens to undeclared event types: {', '.join(sorted(unknown))} "
                f"(declared: {', '.join(self._types)})"
            )
        listener = _Listener(plugin, function, wanted, ListenerStats(plugin))
        self._listeners.append(listener)
        for type in wanted:
            self._by_type.setdefault(type, []).append(listener)

    def wants(self, type: str) -> bool:
        """Whether anyone listens to `type`; callers skip building events nobody wants."""
        return type in self._by_type

    @property
    def stats(self) -> list[ListenerStats]:
        for listener in self._listeners:
            listener.stats.queued = len(listener.queue)
            listener.stats.terminal_queued = len(listener.queue) - listener.droppable
        return [listener.stats for listener in self._listeners]

    def terminal_backlog(self) -> int:
        """The most terminal events any one listener has yet to handle."""
        if not self._listeners:
            return 0
        return max(len(listener.queue) - listener.droppable for listener in self._listeners)

    # -- dispatch --------------------------------------------------------------

    def emit(self, type: str, session: Any, outcome: Outcome | None = None, **data: Any) -> None:
        """Build and dispatch an event of `session`, if anyone listens to `type`."""
        listeners = self._by_type.get(type)
        if listeners is None:
            if type not in self._types:
                raise ValueError(f"event type {type!r} was never declared (declare it with the register_event_types hook)")
            return
        self.dispatch(
            Event(type, session.id, session.request_id, session.model, session.provider, time.time(), data, session.identity, outcome, session.team, session.key_id)
        )

    def emit_global(self, type: str, data: dict[str, Any]) -> None:
        """Build and dispatch an event that belongs to no session (its session
        fields are empty; `model` and `provider` come from `data` when it has
        them), if anyone listens to `type`."""
        listeners = self._by_type.get(type)
        if listeners is None:
            if type not in self._types:
                raise ValueError(f"event type {type!r} was never declared (declare it with the register_event_types hook)")
            return
        if type in CORE_TYPES:
            raise ValueError(f"{type!r} is a session event: only a session emits it")
        self.dispatch(
            Event(type, "", "", str(data.get("model") or ""), str(data.get("provider") or ""), time.time(), data, str(data.get("identity") or ""), None, data.get("team"), data.get("key_id"))
        )

    def dispatch(self, event: Event) -> None:
        terminal = event.outcome is not None
        for listener in self._by_type.get(event.type, ()):
            if not terminal:
                if listener.droppable >= self.queue_size:
                    listener.stats.dropped += 1
                    continue
                listener.droppable += 1
            listener.queue.append(event)
            waiting = listener.waiting
            if waiting is not None:
                listener.waiting = None
                waiting.set()

    def services(self) -> list[tuple[str, str, Callable[[], Any]]]:
        """One (plugin, name, run) per listener, for the runtime's supervisor."""
        return [(listener.plugin, f"listener:{listener.plugin}", self._deliverer(listener)) for listener in self._listeners]

    async def drain(self) -> None:
        """Wait until every listener's queue is empty (the caller bounds the wait)."""
        while any(listener.queue for listener in self._listeners):
            await trio.sleep(0.01)

    def _deliverer(self, listener: _Listener) -> Callable[[], Any]:
        function, stats, queue = listener.function, listener.stats, listener.queue
        timeout = self.listener_timeout

        async def handle(event: Event) -> None:
            try:
                result = function(event)
                if inspect.isawaitable(result):
                    with trio.move_on_after(timeout) as scope:
                        await result
                    if scope.cancelled_caught:
                        stats.errors += 1
                        stats.timeouts += 1
                        log.error(
                            "on_event listener of plugin %r took longer than %g s on a %s event; it was cancelled",
                            listener.plugin, timeout, event.type,
                        )
                        return
                stats.delivered += 1
            except Exception:
                stats.errors += 1
                log.exception("on_event listener of plugin %r failed on a %s event", listener.plugin, event.type)

        async def deliver() -> None:
            handled = 0
            while True:
                if not queue:
                    waiting = listener.waiting = trio.Event()
                    await waiting.wait()
                    continue
                event = queue[0]
                await handle(event)
                # Taken off the queue only once handled: the backlog the runtime
                # counts includes the event in hand, and a listener task that was
                # cancelled mid-event (a restart) does not lose it.
                queue.popleft()
                if event.outcome is None:
                    listener.droppable -= 1
                handled += 1
                if handled % _CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()

        return deliver
