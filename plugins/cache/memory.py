"""The memory backend: an LRU of encoded entries within a byte budget, in this
process only."""

from __future__ import annotations

import collections
import time
from typing import Any, Awaitable, Callable

import attrs

from streamvisor.hooks import Health

from .backend import SizeGauges


@attrs.define
class _Stored:
    blob: bytes
    model: str
    expires: float


class MemoryBackend:
    """An LRU of encoded entries within a byte budget, each living `ttl` seconds.

    Recency order is the OrderedDict `entries`; since every entry gets the same
    TTL, insertion order is expiry order, kept in `expiry` so that purging costs
    only what has expired. The byte count is the size of the encoded entries
    plus their keys.
    """

    name = "memory"

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.entries: collections.OrderedDict[str, _Stored] = collections.OrderedDict()
        self.expiry: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.by_model: dict[str, set[str]] = {}
        self.bytes = 0
        self.evictions = 0

    def _size(self, key: str, stored: _Stored) -> int:
        return len(key) + len(stored.blob)

    def _remove(self, key: str) -> bool:
        stored = self.entries.pop(key, None)
        if stored is None:
            return False
        self.expiry.pop(key, None)
        self.bytes -= self._size(key, stored)
        keys = self.by_model.get(stored.model)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_model[stored.model]
        return True

    def purge_expired(self) -> int:
        now = self.clock()
        removed = 0
        while self.expiry:
            key, expires = next(iter(self.expiry.items()))
            if expires > now:
                break
            self._remove(key)
            removed += 1
        return removed

    async def get(self, key: str) -> bytes | None:
        self.purge_expired()
        stored = self.entries.get(key)
        if stored is None:
            return None
        self.entries.move_to_end(key)
        return stored.blob

    async def put(self, key: str, model: str, blob: bytes) -> bool:
        self._remove(key)
        stored = _Stored(blob, model, self.clock() + self.ttl)
        size = self._size(key, stored)
        if size > self.max_bytes:
            return False
        self.purge_expired()
        while self.entries and self.bytes + size > self.max_bytes:
            oldest = next(iter(self.entries))
            self._remove(oldest)
            self.evictions += 1
        self.entries[key] = stored
        self.expiry[key] = stored.expires
        self.by_model.setdefault(model, set()).add(key)
        self.bytes += size
        return True

    async def remove_all(self) -> int:
        self.purge_expired()
        count = len(self.entries)
        self.entries.clear()
        self.expiry.clear()
        self.by_model.clear()
        self.bytes = 0
        return count

    async def remove_model(self, model: str) -> int:
        self.purge_expired()
        keys = list(self.by_model.get(model, ()))
        return sum(self._remove(key) for key in keys)

    async def remove_key(self, key: str) -> int:
        self.purge_expired()
        return int(self._remove(key))

    async def stats(self) -> tuple[int, int]:
        self.purge_expired()
        return len(self.entries), self.bytes

    async def ping(self) -> Health:
        entries, size = await self.stats()
        return Health(True, {"backend": self.name, "entries": entries, "bytes": size})

    def describe(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "evictions": self.evictions}

    def watch(self, gauges: SizeGauges) -> None:
        # The sizes are known at any time: read them at scrape.
        gauges.live(lambda: len(self.entries), lambda: self.bytes)

    def service(self) -> Callable[[], Awaitable[None]] | None:
        return None

    async def wait_ready(self, timeout: float) -> bool:
        return True
