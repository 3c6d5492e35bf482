"""The `cache` plugin: an exact-match response cache around the provider call.

It owns the cache key (a sha256 of the canonical JSON of everything in a request
that changes the answer), the policy of what may be cached (temperature), the
recording of a complete answer as a compact list of chunks and its replay as a
stream, the two backends (an in-memory LRU with a byte budget and a TTL, and
Redis through coredis, shared by several instances), its admin routes
(`/admin/cache/status`, `/admin/cache/invalidate`), its Prometheus metrics and
its readiness check.

The cache never fails a request: a backend error or a backend that does not
answer within `backend_timeout_seconds` is logged, counted, and the request goes
to the provider. Only answers whose stream ended normally with finish_reason
stop, length or tool_calls are stored; a failed, stopped or disconnected stream
closes the middleware before it reaches the store.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Literal
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson
import trio
from prometheus_client import Counter, Gauge
from quart import request as http_request

from streamvisor.core.chat import ChatRequest, Delta, Usage
from streamvisor.core.errors import APIError, InvalidRequest, ModelNotFound
from streamvisor.core.health import Health, require_admin
from streamvisor.core.metrics import Labelled
from streamvisor.hooks import hookimpl
from streamvisor.config.validators import positive

log = logging.getLogger("streamvisor.plugins.cache")

#: Finish reasons of a complete answer; anything else (content_filter, none at
#: all, stopped) is not stored.
STORABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
#: Entry format version; an entry of another version is ignored (a miss).
ENTRY_VERSION = 1
_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: Replay yields to the scheduler after this many chunks, so that a long cached
#: answer does not hold the event loop.
_REPLAY_CHECKPOINT_EVERY = 64
#: A backend error is logged at warning level at most this often per operation
#: (a Redis that is down would otherwise log on every request).
_ERROR_LOG_INTERVAL = 10.0
#: Work bounds of the Redis maintenance loops: keys per command, pages per call.
_REDIS_PAGE = 500
_REDIS_MAX_PAGES = 10_000
#: Pause before the Redis service makes a new client after a failure.
_CLIENT_RESTART_DELAY = 1.0


@attrs.frozen
class Settings:
    #: "memory": this process only; "redis": shared by every instance using the
    #: same redis_url and key_prefix.
    backend: Literal["memory", "redis"] = "memory"
    #: Memory backend: the budget of all entries (their serialized size); the
    #: least recently used entries are evicted beyond it.
    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=positive)
    #: The largest answer one entry may hold (serialized); larger answers are not stored.
    max_entry_bytes: int = attrs.field(default=1024 * 1024, validator=positive)
    #: How long an entry lives after it was stored.
    ttl_seconds: float = attrs.field(default=3600.0, validator=positive)
    #: Cache requests with a temperature above 0 (their answers vary by design).
    cache_nonzero_temperature: bool = False
    #: Cache requests that set no temperature (the model's default sampling,
    #: usually random).
    cache_unset_temperature: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Every Redis key of the cache starts with this; instances sharing it share entries.
    key_prefix: str = "streamvisor:cache:"
    #: The longest a request waits for the backend (lookup, store); past it the
    #: operation counts as an error and the request goes on without the cache.
    backend_timeout_seconds: float = attrs.field(default=0.5, validator=positive)
    #: Redis: how often the entries and bytes gauges are refreshed (and expired
    #: entries dropped from the accounting).
    stats_interval_seconds: float = attrs.field(default=15.0, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.backend == "memory" and self.max_entry_bytes > self.max_bytes:
            raise ValueError(f"max_entry_bytes ({self.max_entry_bytes}) must not exceed max_bytes ({self.max_bytes})")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")
        if self.backend == "redis" and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, got {redact_url(self.redis_url)!r}")


class BackendError(Exception):
    """The backend failed or is not available."""


# -- keys and policy -----------------------------------------------------------


def cache_key(request: ChatRequest, model: str) -> str:
    """The sha256 of the canonical form of everything that changes the answer.

    `model` is the canonical model (provider and the provider's model name), so
    that aliases share entries. `stream`, `stream_options`, `user` and the
    caller's identity are left out: they do not change the text.
    """
    canonical = {
        "model": model,
        "messages": request.messages,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
        "seed": request.seed,
        "extra": request.extra,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def bypass_reason(request: ChatRequest, settings: Settings) -> str | None:
    """Why `request` must not be cached, or None when it may be."""
    temperature = request.temperature
    if temperature is None:
        return None if settings.cache_unset_temperature else "unset_temperature"
    if temperature > 0 and not settings.cache_nonzero_temperature:
        return "nonzero_temperature"
    return None


# -- entries -------------------------------------------------------------------


@attrs.frozen
class Entry:
    """A cached answer: its chunks as (content, reasoning, tool_calls,
    finish_reason) pieces, and the usage the original answer reported."""

    model: str
    created: float
    pieces: list[list[Any]]
    usage: Usage | None

    def encode(self) -> bytes:
        usage = None
        if self.usage is not None:
            u = self.usage
            usage = [u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.exact]
        return orjson.dumps({"v": ENTRY_VERSION, "model": self.model, "created": self.created, "usage": usage, "chunks": self.pieces})

    @classmethod
    def decode(cls, blob: bytes) -> "Entry":
        data = orjson.loads(blob)
        if not isinstance(data, dict) or data.get("v") != ENTRY_VERSION:
            raise ValueError("not a cache entry of this version")
        usage = data.get("usage")
        return cls(
            model=data["model"],
            created=float(data["created"]),
            pieces=data["chunks"],
            usage=None if usage is None else Usage(int(usage[0]), int(usage[1]), int(usage[2]), bool(usage[3])),
        )

    def deltas(self) -> list[Delta]:
        """The chunks to replay; the last one carries the original usage."""
        out = []
        for piece in self.pieces:
            content, reasoning, tool_calls, finish = (list(piece) + [None] * 4)[:4]
            out.append(Delta(content=content, reasoning=reasoning, tool_calls=tool_calls, finish_reason=finish))
        if out and self.usage is not None:
            out[-1] = attrs.evolve(out[-1], usage=self.usage)
        return out


class Recorder:
    """Collects the visible pieces of an answer as they stream by, up to a bound.

    An answer that outgrows `limit` is dropped at once (its pieces are freed)
    and will not be stored, so a long stream costs no more than `limit`.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pieces: list[list[Any]] = []
        self.size = 0
        self.oversize = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if self.oversize:
            return
        piece = [delta.content or None, delta.reasoning or None, delta.tool_calls or None, delta.finish_reason]
        while piece and piece[-1] is None:
            piece.pop()
        if not piece:
            return  # a role-only or usage-only delta: nothing to replay
        # An estimate (characters, not bytes); the encoded entry is checked exactly.
        self.size += 16 + len(piece[0] or "") + (len(piece[1] or "") if len(piece) > 1 else 0)
        if len(piece) > 2 and piece[2]:
            self.size += len(orjson.dumps(piece[2]))
        if self.size > self.limit:
            self.oversize = True
            self.pieces = []
            return
        self.pieces.append(piece)

    def entry(self, model: str) -> Entry | None:
        """The entry to store, or None when the answer is not complete or too big."""
        if self.oversize or self.finish_reason not in STORABLE_FINISH_REASONS or not self.pieces:
            return None
        return Entry(model=model, created=time.time(), pieces=self.pieces, usage=self.usage)


# -- backends ------------------------------------------------------------------


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


# The Redis layout under the prefix P:
#   P e:<hash>   the encoded entry, with PX ttl
#   P idx        sorted set: hash -> expiry (ms, Redis clock); entries, "all"
#   P meta       hash: hash -> "<size> <model>"; bytes and by-model bookkeeping
#   P stats      hash: entries, bytes (of what was stored and has not expired)
#   P m:<model>  set of hashes of one model
# Every change is a Lua script, so the bookkeeping of instances sharing a prefix
# never drifts. The bookkeeping keys get the ttl too (refreshed on every store),
# so an abandoned prefix disappears by itself. Scripts build some key names from
# ARGV: a standalone Redis (not Redis Cluster) is assumed.

_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LUA_FORGET = """
local function forget(prefix, idx, meta, stats, hash)
  local removed = redis.call('DEL', prefix .. 'e:' .. hash)
  local info = redis.call('HGET', meta, hash)
  if info then
    local sp = string.find(info, ' ', 1, true)
    redis.call('HINCRBY', stats, 'entries', -1)
    redis.call('HINCRBY', stats, 'bytes', -tonumber(string.sub(info, 1, sp - 1)))
    redis.call('SREM', prefix .. 'm:' .. string.sub(info, sp + 1), hash)
    redis.call('HDEL', meta, hash)
  end
  redis.call('ZREM', idx, hash)
  return removed
end
"""

# KEYS: idx, meta, stats; ARGV: prefix, hash, blob, ttl_ms, model
_LUA_STORE = (
    _LUA_NOW
    + _LUA_FORGET
    + """
local prefix, hash, blob, ttl, model = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
forget(prefix, KEYS[1], KEYS[2], KEYS[3], hash)
local size = string.len(blob)
redis.call('SET', prefix .. 'e:' .. hash, blob, 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, hash)
redis.call('HSET', KEYS[2], hash, size .. ' ' .. model)
redis.call('HINCRBY', KEYS[3], 'entries', 1)
redis.call('HINCRBY', KEYS[3], 'bytes', size)
local mkey = prefix .. 'm:' .. model
redis.call('SADD', mkey, hash)
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], mkey}) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return size
"""
)

# KEYS: idx, meta, stats; ARGV: prefix, hash...
_LUA_REMOVE = (
    _LUA_FORGET
    + """
local removed = 0
for i = 2, #ARGV do
  removed = removed + forget(ARGV[1], KEYS[1], KEYS[2], KEYS[3], ARGV[i])
end
return removed
"""
)

# KEYS: idx, meta, stats; ARGV: prefix, limit. Drops expired entries from the
# bookkeeping; returns how many it found.
_LUA_TRIM = (
    _LUA_NOW
    + _LUA_FORGET
    + """
local hashes = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, hash in ipairs(hashes) do forget(ARGV[1], KEYS[1], KEYS[2], KEYS[3], hash) end
return #hashes
"""
)


class _QuietConnectFailures(logging.Filter):
    """Demote coredis' "Connection attempt failed unexpectedly!" to DEBUG.

    coredis logs it at ERROR, with a long traceback, whenever a connection
    attempt is cut short, which includes every lookup that our own timeout ends
    while Redis hangs: one per request. The failure is already raised to the
    plugin, which counts it and logs a rate-limited warning.
    """

    message = "Connection attempt failed unexpectedly!"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and record.msg == self.message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_QUIET_CONNECT_FAILURES = _QuietConnectFailures()


def quiet_coredis_connect_failures() -> None:
    logger = logging.getLogger("coredis")
    if _QUIET_CONNECT_FAILURES not in logger.filters:
        logger.addFilter(_QUIET_CONNECT_FAILURES)


class RedisBackend:
    """Entries in Redis, shared by every instance with the same URL and prefix.

    The coredis client must be entered (`async with`) by a long-lived task whose
    task group owns the connections: the plugin's `redis` service actor does
    that and hands the entered client here (`client`); every session then uses
    it concurrently (coredis multiplexes commands on pooled connections). While
    no client is entered, every operation raises `BackendError`.
    """

    name = "redis"

    def __init__(self, url: str, prefix: str, ttl: float) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        self.client: Any = None
        self._keys = [prefix + "idx", prefix + "meta", prefix + "stats"]

    def _client(self) -> Any:
        if self.client is None:
            raise BackendError("the Redis client is not connected")
        return self.client

    async def get(self, key: str) -> bytes | None:
        return await self._client().get(self.prefix + "e:" + key)

    async def put(self, key: str, model: str, blob: bytes) -> bool:
        await self._client().eval(_LUA_STORE, keys=self._keys, args=[self.prefix, key, blob, self.ttl_ms, model])
        return True

    async def _remove(self, hashes: list[Any]) -> int:
        if not hashes:
            return 0
        return int(await self._client().eval(_LUA_REMOVE, keys=self._keys, args=[self.prefix, *hashes]))

    async def remove_all(self) -> int:
        removed = 0
        for _ in range(_REDIS_MAX_PAGES):
            hashes = await self._client().zrange(self._keys[0], 0, _REDIS_PAGE - 1)
            if not hashes:
                break
            removed += await self._remove(list(hashes))
        return removed

    async def remove_model(self, model: str) -> int:
        removed = 0
        model_key = self.prefix + "m:" + model
        for _ in range(_REDIS_MAX_PAGES):
            # SPOP takes the hashes out of the model's set even when their
            # bookkeeping is gone, so this loop always makes progress.
            hashes = await self._client().spop(model_key, _REDIS_PAGE)
            if not hashes:
                break
            removed += await self._remove(list(hashes))
        return removed

    async def remove_key(self, key: str) -> int:
        return await self._remove([key])

    async def trim(self) -> int:
        trimmed = 0
        for _ in range(_REDIS_MAX_PAGES):
            found = int(await self._client().eval(_LUA_TRIM, keys=self._keys, args=[self.prefix, _REDIS_PAGE]))
            trimmed += found
            if found < _REDIS_PAGE:
                break
        return trimmed

    async def stats(self) -> tuple[int, int]:
        await self.trim()
        values = await self._client().hmget(self._keys[2], ["entries", "bytes"])
        entries, size = (int(v or 0) for v in values)
        return max(0, entries), max(0, size)

    async def ping(self) -> Health:
        reply = await self._client().ping()
        return Health(True, {"backend": self.name, "url": redact_url(self.url), "ping": _text(reply)})

    def describe(self) -> dict[str, Any]:
        return {"redis_url": redact_url(self.url), "key_prefix": self.prefix, "connected": self.client is not None}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def redact_url(url: str) -> str:
    """The URL without its password, for status pages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# -- counting ------------------------------------------------------------------


@attrs.define
class CacheMetrics:
    """The plugin's counts, kept both as plain numbers (for the status route) and
    as Prometheus metrics in the runtime's registry."""

    hits_total: Counter
    misses_total: Counter
    bypasses_total: Labelled
    stores_total: Counter
    errors_total: Counter
    entries: Gauge
    bytes: Gauge
    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    stores: int = 0
    errors: int = 0

    @classmethod
    def create(cls, registry: Any, backend: str) -> "CacheMetrics":
        return cls(
            hits_total=Counter("streamvisor_cache_hits", "Requests answered from the cache.", registry=registry),
            misses_total=Counter("streamvisor_cache_misses", "Cacheable requests not found in the cache.", registry=registry),
            bypasses_total=Labelled(
                Counter("streamvisor_cache_bypasses", "Requests the cache did not look up (not cacheable).", ["reason"], registry=registry)
            ),
            stores_total=Counter("streamvisor_cache_stores", "Answers stored in the cache.", registry=registry),
            errors_total=Counter(
                "streamvisor_cache_errors", "Cache backend operations that failed or timed out.", ["operation"], registry=registry
            ),
            entries=Gauge("streamvisor_cache_entries", f"Entries in the cache ({backend} backend).", registry=registry),
            bytes=Gauge("streamvisor_cache_bytes", f"Serialized size of the cache's entries ({backend} backend).", registry=registry),
        )

    def hit(self) -> None:
        self.hits += 1
        self.hits_total.inc()

    def miss(self) -> None:
        self.misses += 1
        self.misses_total.inc()

    def bypass(self, reason: str) -> None:
        self.bypasses += 1
        self.bypasses_total(reason).inc()

    def stored(self) -> None:
        self.stores += 1
        self.stores_total.inc()

    def error(self, operation: str) -> None:
        self.errors += 1
        self.errors_total.labels(operation).inc()

    def sizes(self, entries: int, size: int) -> None:
        self.entries.set(entries)
        self.bytes.set(size)


# -- the plugin ----------------------------------------------------------------


class CachePlugin:
    Settings = Settings

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: MemoryBackend | RedisBackend
        if settings.backend == "redis":
            self.backend = RedisBackend(settings.redis_url, settings.key_prefix, settings.ttl_seconds)
            quiet_coredis_connect_failures()
        else:
            self.backend = MemoryBackend(settings.max_bytes, settings.ttl_seconds)
        self.runtime: Any = None
        self.metrics: CacheMetrics | None = None
        self._connected = trio.Event()
        self._last_error_log: dict[str, float] = {}

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    async def startup(self, runtime):
        self.runtime = runtime
        self.metrics = CacheMetrics.create(runtime.metrics, self.backend.name)
        if isinstance(self.backend, MemoryBackend):
            backend = self.backend
            # The memory backend's sizes are known at any time: read them at scrape.
            self.metrics.entries.set_function(lambda: len(backend.entries))
            self.metrics.bytes.set_function(lambda: backend.bytes)
        else:
            # The redis service enters the client; wait for it (entering does
            # not connect, so this is quick even when Redis is down).
            with trio.move_on_after(5):
                await self._connected.wait()
            if not self._connected.is_set():
                log.warning("the Redis cache client was not ready at start-up; requests go uncached until it is")

    @hookimpl
    def register_services(self, register):
        if isinstance(self.backend, RedisBackend):
            register("redis", self._run_redis)

    @hookimpl
    def register_middleware(self, register):
        register(self.middleware)

    @hookimpl
    def register_routes(self, register):
        register("/admin/cache/status", require_admin(self._status_view))
        register("/admin/cache/invalidate", require_admin(self._invalidate_view), methods=("POST",))

    @hookimpl
    def register_health_checks(self, register):
        register("backend", self.check)

    # -- the redis client's owner ------------------------------------------------

    async def _run_redis(self) -> None:
        """Own the coredis client for the plugin's lifetime.

        coredis' connection pool runs its connections in a task group that must
        be entered by a task that outlives every user of the client; this
        service is that task, and it refreshes the size gauges meanwhile. It
        does not end on a client failure: it logs it and makes a new client, so
        that a misbehaving Redis never counts against the supervisor's restart
        intensity (which would stop the server).
        """
        # Imported here: a memory-only cache need not pay coredis' import time.
        import coredis
        from coredis.retry import ConstantRetryPolicy

        backend = self.backend
        assert isinstance(backend, RedisBackend)
        timeout = self.settings.backend_timeout_seconds
        while True:
            try:
                client = coredis.Redis.from_url(
                    backend.url,
                    connect_timeout=timeout,
                    stream_timeout=timeout,
                    # One retry, for a pooled connection that went stale (Redis
                    # restarted); more would only spend the request's time budget.
                    retry_policy=ConstantRetryPolicy((coredis.exceptions.ConnectionError,), retries=1, delay=0.01),
                )
                async with client:
                    backend.client = client
                    self._connected.set()
                    try:
                        while True:
                            await trio.sleep(self.settings.stats_interval_seconds)
                            await self._refresh_sizes()
                    finally:
                        backend.client = None
            except Exception:
                if self.metrics is not None:
                    self.metrics.error("client")
                log.exception("the Redis cache client failed; a new one starts in %g s", _CLIENT_RESTART_DELAY)
            await trio.sleep(_CLIENT_RESTART_DELAY)

    async def _refresh_sizes(self) -> tuple[int, int] | None:
        sizes = await self._backend_call("stats", self.backend.stats, timeout=self.settings.backend_timeout_seconds * 4)
        if sizes is not None and self.metrics is not None and isinstance(self.backend, RedisBackend):
            self.metrics.sizes(*sizes)
        return sizes

    # -- backend calls -----------------------------------------------------------

    async def _backend_call(self, operation: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run one backend operation under a timeout; on failure log, count and
        return None. Cancellation of the caller passes through."""
        timeout = self.settings.backend_timeout_seconds if timeout is None else timeout
        try:
            with trio.fail_after(timeout):
                return await fn(*args)
        except trio.TooSlowError:
            self._backend_failed(operation, f"no answer within {timeout:g} s")
        except Exception as exc:
            self._backend_failed(operation, f"{type(exc).__name__}: {exc}")
        return None

    def _backend_failed(self, operation: str, why: str) -> None:
        if self.metrics is not None:
            self.metrics.error(operation)
        now = time.monotonic()
        if now - self._last_error_log.get(operation, -_ERROR_LOG_INTERVAL) >= _ERROR_LOG_INTERVAL:
            self._last_error_log[operation] = now
            log.warning("cache backend %s failed on %s: %s (the request goes on without the cache)", self.backend.name, operation, why)
        else:
            log.debug("cache backend %s failed on %s: %s", self.backend.name, operation, why)

    async def _backend_admin(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A backend operation for an admin route: a failure is a 503."""
        try:
            with trio.fail_after(max(5.0, self.settings.backend_timeout_seconds)):
                return await fn(*args)
        except trio.TooSlowError:
            why = "it did not answer in time"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        if self.metrics is not None:
            self.metrics.error(operation)
        raise APIError(
            f"The cache backend ({self.backend.name}) failed: {why}.",
            status=503,
            type="server_error",
            code="cache_backend_unavailable",
        )

    # -- the middleware ----------------------------------------------------------

    def canonical_model(self, model: str) -> str | None:
        """`provider:target` for a model name the providers know, else None.

        Keys and the by-model index use it, so that aliases share entries.
        """
        try:
            route = self.runtime.providers.resolve(model)
        except ModelNotFound:
            return None
        return f"{route.provider.name}:{route.target}"

    def middleware(self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
        """A plain function, not an async generator: a request the cache does not
        serve gets the rest of the chain itself, with no layer per chunk."""
        runtime, metrics = self.runtime, self.metrics
        session = model = key = None
        if runtime is None or metrics is None:
            reason: str | None = "not_started"
        else:
            session = runtime.sessions.sessions.get(request.session_id)
            reason = bypass_reason(request, self.settings)
            if reason is None:
                model = self.canonical_model(request.model)
                if model is None:
                    reason = "unknown_model"  # the provider call raises the right error
            if reason is None:
                try:
                    key = cache_key(request, model)
                except (TypeError, orjson.JSONEncodeError):
                    # Only a request built in-process can hold what JSON cannot encode.
                    reason = "unkeyable"
        if reason is not None:
            if metrics is not None:
                metrics.bypass(reason)
            if session is not None and reason != "unkeyable":
                session.headers["X-Cache"] = "bypass"
            return call_next(request)
        assert model is not None and key is not None  # no reason to bypass: both were made
        return self._through_cache(request, call_next, session, model, key)

    async def _through_cache(
        self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Any, model: str, key: str
    ) -> AsyncIterator[Delta]:
        runtime, metrics = self.runtime, self.metrics
        assert runtime is not None and metrics is not None
        entry = await self._lookup(key)
        if entry is not None:
            metrics.hit()
            if session is not None:
                session.headers["X-Cache"] = "hit"
                session.headers["X-Cache-Key"] = key
                runtime.events.emit(
                    "cache_hit",
                    session,
                    key=key,
                    backend=self.backend.name,
                    age_seconds=round(max(0.0, time.time() - entry.created), 3),
                    chunks=len(entry.pieces),
                )
            for index, delta in enumerate(entry.deltas()):
                yield delta
                if index % _REPLAY_CHECKPOINT_EVERY == _REPLAY_CHECKPOINT_EVERY - 1:
                    await trio.lowlevel.checkpoint()
            return

        metrics.miss()
        if session is not None:
            session.headers["X-Cache"] = "miss"
            session.headers["X-Cache-Key"] = key
        recorder = Recorder(self.settings.max_entry_bytes)
        async with aclosing(call_next(request)) as stream:
            async for delta in stream:
                recorder.add(delta)
                yield delta
        # Reached only when the upstream ended normally: an error propagates, and
        # a stop or disconnect closes this generator at its `yield`.
        await self._store(key, recorder.entry(model))

    async def _lookup(self, key: str) -> Entry | None:
        blob = await self._backend_call("get", self.backend.get, key)
        if blob is None:
            return None
        try:
            return Entry.decode(blob)
        except Exception as exc:
            self._backend_failed("decode", f"an unreadable entry ({type(exc).__name__}: {exc})")
            return None

    async def _store(self, key: str, entry: Entry | None) -> None:
        if entry is None:
            return
        blob = entry.encode()
        if len(blob) > self.settings.max_entry_bytes:
            return
        stored = await self._backend_call("set", self.backend.put, key, entry.model, blob)
        if stored and self.metrics is not None:
            self.metrics.stored()

    # -- readiness and admin -----------------------------------------------------

    async def check(self) -> Health:
        try:
            with trio.fail_after(max(1.0, self.settings.backend_timeout_seconds)):
                return await self.backend.ping()
        except trio.TooSlowError:
            return Health(False, {"backend": self.backend.name, "error": "no answer in time"})
        except Exception as exc:
            return Health(False, {"backend": self.backend.name, "error": f"{type(exc).__name__}: {exc}"})

    async def status(self) -> dict[str, Any]:
        metrics = self.metrics
        assert metrics is not None
        body: dict[str, Any] = {"backend": self.backend.name, "reachable": True, "error": None}
        try:
            with trio.fail_after(max(5.0, self.settings.backend_timeout_seconds)):
                entries, size = await self.backend.stats()
        except trio.TooSlowError:
            entries = size = None
            body.update(reachable=False, error="no answer in time")
        except Exception as exc:
            entries = size = None
            body.update(reachable=False, error=f"{type(exc).__name__}: {exc}")
        if entries is None:
            metrics.error("stats")
        elif isinstance(self.backend, RedisBackend):
            metrics.sizes(entries, size)
        looked_up = metrics.hits + metrics.misses
        body.update(
            entries=entries,
            bytes=size,
            hits=metrics.hits,
            misses=metrics.misses,
            bypasses=metrics.bypasses,
            stores=metrics.stores,
            errors=metrics.errors,
            hit_rate=round(metrics.hits / looked_up, 4) if looked_up else None,
            ttl_seconds=self.settings.ttl_seconds,
            max_entry_bytes=self.settings.max_entry_bytes,
            **self.backend.describe(),
        )
        return body

    async def _status_view(self) -> dict[str, Any]:
        return await self.status()

    async def _invalidate_view(self) -> dict[str, Any]:
        data = await http_request.get_data(cache=False)
        try:
            body = orjson.loads(data) if data else None
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
        return await self.invalidate(body)

    async def invalidate(self, body: Any) -> dict[str, Any]:
        """Remove entries: `{"all": true}`, `{"model": name}` or `{"key": hash}`."""
        usage = 'expected one of {"all": true}, {"model": "<name>"}, {"key": "<sha256 hex>"}'
        if not isinstance(body, dict) or len(body) != 1:
            raise InvalidRequest(f"The body must be a JSON object with exactly one field: {usage}.")
        (field, value), = body.items()
        if field == "all":
            if value is not True:
                raise InvalidRequest(f"'all' must be true: {usage}.", param="all")
            removed = await self._backend_admin("invalidate", self.backend.remove_all)
            return {"removed": removed, "scope": "all"}
        if field == "model":
            if not isinstance(value, str) or not value:
                raise InvalidRequest("'model' must be a non-empty string.", param="model")
            # A name the providers know is made canonical; anything else is
            # taken as a canonical name already (a model no longer configured).
            model = self.canonical_model(value) or value
            removed = await self._backend_admin("invalidate", self.backend.remove_model, model)
            return {"removed": removed, "scope": "model", "model": model}
        if field == "key":
            if not isinstance(value, str) or not _KEY_PATTERN.match(value):
                raise InvalidRequest("'key' must be a cache key: 64 lowercase hex digits (the X-Cache-Key header).", param="key")
            removed = await self._backend_admin("invalidate", self.backend.remove_key, value)
            return {"removed": removed, "scope": "key", "key": value}
        raise InvalidRequest(f"Unknown field '{field}': {usage}.", param=field)
