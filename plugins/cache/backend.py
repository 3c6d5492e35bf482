"""The one interface every cache backend implements, so that the plugin never
asks which backend it has.

A backend stores encoded entries (`bytes`) under keys, each with the model it
answers for (so a model's entries can be invalidated together), for the TTL it
was made with. Every method may raise; the plugin bounds each call with a
timeout, counts failures and goes on without the cache.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

from streamvisor.hooks import Health


class BackendError(Exception):
    """The backend failed or is not available."""


class SizeGauges(Protocol):
    """Where a backend reports its entry count and byte size (the plugin's
    Prometheus gauges)."""

    def sizes(self, entries: int, size: int) -> None: ...

    def live(self, entries: Callable[[], int], size: Callable[[], int]) -> None: ...

    def error(self, operation: str) -> None: ...


@runtime_checkable
class CacheBackend(Protocol):
    #: "memory", "redis": shown in status and metrics.
    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, model: str, blob: bytes) -> bool:
        """Store `blob`; False when it does not fit at all."""
        ...

    async def remove_all(self) -> int: ...

    async def remove_model(self, model: str) -> int: ...

    async def remove_key(self, key: str) -> int: ...

    async def stats(self) -> tuple[int, int]:
        """(entries, bytes) now."""
        ...

    async def ping(self) -> Health: ...

    def describe(self) -> dict[str, Any]:
        """Settings and counters for the status route."""
        ...

    def watch(self, gauges: SizeGauges) -> None:
        """Keep `gauges` up to date (at scrape time, or from the backend's service)."""
        ...

    def service(self) -> Callable[[], Awaitable[None]] | None:
        """A long-lived task the backend needs (it owns a client), run by the
        plugin as a supervised service; None when it needs none."""
        ...

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` for the backend to be usable; whether it is."""
        ...
