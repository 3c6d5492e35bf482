"""Session events and their dispatch to `on_event` listeners.

Dispatch must never change or delay a stream, so a listener is never called on
the stream's task. Each listener gets its own bounded memory channel and its own
task (a permanent child of the runtime's supervisor): `dispatch` only does a
`send_nowait` per listener. A full queue drops the event and counts the drop; a
listener that raises is logged and counted, and keeps receiving later events. A
hanging async listener fills only its own queue.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable

import attrs
import trio

log = logging.getLogger("streamvisor.events")

EVENT_TYPES = (
    "created",
    "started",
    "first_token",
    "chunk",
    "retry",
    "fallback",
    "cache_hit",
    "completed",
    "failed",
    "stopped",
    "disconnected",
)

#: The event types that end a session; each session dispatches exactly one.
TERMINAL_TYPES = frozenset({"completed", "failed", "stopped", "disconnected"})


@attrs.frozen(slots=True)
class Event:
    type: str
    session_id: str
    request_id: str
    model: str
    provider: str
    #: Wall-clock time of the event (seconds since the epoch).
    at: float
    data: dict[str, Any] = attrs.field(factory=dict)
    #: Who asked: the API key's identity once keys exist, "anonymous" until then.
    identity: str = "anonymous"


@attrs.define(eq=False)
class ListenerStats:
    plugin: str
    delivered: int = 0
    errors: int = 0
    dropped: int = 0


@attrs.define(eq=False)
class _Listener:
    plugin: str
    function: Callable[[Event], Any]
    send: trio.MemorySendChannel[Event]
    receive: trio.MemoryReceiveChannel[Event]
    stats: ListenerStats
    types: frozenset[str]


class EventDispatcher:
    """Fans events out to listeners, each receiving only the types it listens to
    (all types unless its `on_event` was decorated with `listens_to`)."""

    def __init__(self, queue_size: int = 1024) -> None:
        self.queue_size = queue_size
        self._listeners: list[_Listener] = []
        self._by_type: dict[str, list[_Listener]] = {}

    def add_listener(self, plugin: str, function: Callable[[Event], Any], types: frozenset[str] | None = None) -> None:
        unknown = (types or frozenset()) - set(EVENT_TYPES)
        if unknown:
            raise ValueError(f"plugin {plugin!r} listens to unknown event types: {', '.join(sorted(unknown))}")
        send, receive = trio.open_memory_channel[Event](self.queue_size)
        listener = _Listener(plugin, function, send, receive, ListenerStats(plugin), types or frozenset(EVENT_TYPES))
        self._listeners.append(listener)
        for type in listener.types:
            self._by_type.setdefault(type, []).append(listener)

    def wants(self, type: str) -> bool:
        """Whether anyone listens to `type`; callers skip building events nobody wants."""
        return type in self._by_type

    @property
    def stats(self) -> list[ListenerStats]:
        return [listener.stats for listener in self._listeners]

    def emit(self, type: str, session: Any, **data: Any) -> None:
        if type not in self._by_type:
            return
        self.dispatch(
            Event(type, session.id, session.request_id, session.model, session.provider, time.time(), data, session.identity)
        )

    def dispatch(self, event: Event) -> None:
        for listener in self._by_type.get(event.type, ()):
            try:
                listener.send.send_nowait(event)
            except trio.WouldBlock:
                listener.stats.dropped += 1

    def services(self) -> list[tuple[str, Callable[[], Any]]]:
        """One (name, run) per listener, for the runtime's supervisor."""
        return [(f"listener:{listener.plugin}", _deliverer(listener)) for listener in self._listeners]


def _deliverer(listener: _Listener) -> Callable[[], Any]:
    function, stats, receive = listener.function, listener.stats, listener.receive

    async def handle(event: Event) -> None:
        try:
            result = function(event)
            if inspect.isawaitable(result):
                await result
            stats.delivered += 1
        except Exception:
            stats.errors += 1
            log.exception("on_event listener of plugin %r failed on %s event", listener.plugin, event.type)

    async def deliver() -> None:
        async for event in receive:
            await handle(event)
            # Then whatever else is queued already (at most the queue's bound),
            # without a trip through the scheduler per event.
            while True:
                try:
                    event = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await handle(event)

    return deliver
