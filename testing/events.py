"""Captured events: a listener plugin that keeps every event a server dispatches,
for tests to wait on and assert about."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from streamvisor.hooks import Event, hookimpl

__all__ = ["EventLog"]


class EventLog:
    """A plugin (register it under any name) whose `on_event` keeps every event.

    Thread-safe: the server's loop appends, the test thread reads. Terminal
    events are never dropped; with a small `[server] event_queue_size` others
    may be.
    """

    streamvisor_contract = "1.0"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Condition()

    @hookimpl
    def on_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            self._lock.notify_all()

    def of(self, type: str | None = None, session_id: str | None = None) -> list[Event]:
        """The events so far, of one type and/or one session."""
        with self._lock:
            return [e for e in self.events if (type is None or e.type == type) and (session_id is None or e.session_id == session_id)]

    def types(self, session_id: str) -> list[str]:
        """The types of one session's events, in order."""
        return [e.type for e in self.of(session_id=session_id)]

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 5.0) -> list[Event]:
        """Wait until `predicate(events)` holds; the events then."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the events did not arrive within {timeout} s; seen: {[e.type for e in self.events][-20:]}")
                self._lock.wait(left)
            return list(self.events)

    def wait_for_type(self, type: str, count: int = 1, timeout: float = 5.0) -> list[Event]:
        """Wait for `count` events of `type`; those events."""
        self.wait_for(lambda events: sum(e.type == type for e in events) >= count, timeout)
        return self.of(type)

    def clear(self) -> None:
        with self._lock:
            self.events.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self.events)

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"EventLog({len(self)} events)"

    def __getitem__(self, index: Any) -> Any:
        with self._lock:
            return self.events[index]
