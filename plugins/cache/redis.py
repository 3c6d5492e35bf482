"""The Redis backend: entries shared by every instance using the same Redis and
key prefix, through coredis, with its bookkeeping kept exact by Lua scripts.

The backend owns its client: `run` is the plugin's `redis` service, which enters
the coredis client for the plugin's lifetime and makes a new one after a failure.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import trio

from streamvisor.hooks import Health

from .backend import BackendError, SizeGauges

log = logging.getLogger("streamvisor.plugins.cache")

#: Work bounds of the Redis maintenance loops: keys per command, pages per call.
_REDIS_PAGE = 500
_REDIS_MAX_PAGES = 10_000
#: Pause before the service makes a new client after a failure.
CLIENT_RESTART_DELAY = 1.0


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

    def __init__(self, url: str, prefix: str, ttl: float, timeout: float = 0.5, stats_interval: float = 15.0) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl * 1000))
        #: The bound on connecting and on each command.
        self.timeout = timeout
        #: How often the service refreshes the size gauges.
        self.stats_interval = stats_interval
        self.client: Any = None
        self.gauges: SizeGauges | None = None
        self._connected = trio.Event()
        self._keys = [prefix + "idx", prefix + "meta", prefix + "stats"]
        quiet_coredis_connect_failures()

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

    def watch(self, gauges: SizeGauges) -> None:
        # Counting entries costs Redis commands: the service refreshes the
        # gauges every stats_interval instead of at each scrape.
        self.gauges = gauges

    def service(self) -> Callable[[], Awaitable[None]] | None:
        return self.run

    async def wait_ready(self, timeout: float) -> bool:
        # Entering the client does not connect, so this is quick even when
        # Redis is down: it waits only for the service to have started.
        with trio.move_on_after(timeout):
            await self._connected.wait()
        return self._connected.is_set()

    async def run(self) -> None:
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

        while True:
            try:
                client = coredis.Redis.from_url(
                    self.url,
                    connect_timeout=self.timeout,
                    stream_timeout=self.timeout,
                    # One retry, for a pooled connection that went stale (Redis
                    # restarted); more would only spend the request's time budget.
                    retry_policy=ConstantRetryPolicy((coredis.exceptions.ConnectionError,), retries=1, delay=0.01),
                )
                async with client:
                    self.client = client
                    self._connected.set()
                    try:
                        while True:
                            await trio.sleep(self.stats_interval)
                            await self.refresh_sizes()
                    finally:
                        self.client = None
            except Exception:
                if self.gauges is not None:
                    self.gauges.error("client")
                log.exception("the Redis cache client failed; a new one starts in %g s", CLIENT_RESTART_DELAY)
            await trio.sleep(CLIENT_RESTART_DELAY)

    async def refresh_sizes(self) -> tuple[int, int] | None:
        """Read the entry count and size into the gauges; None when Redis failed."""
        try:
            with trio.fail_after(self.timeout * 4):
                sizes = await self.stats()
        except Exception as exc:  # a failed refresh is counted; the next one may work
            if self.gauges is not None:
                self.gauges.error("stats")
            log.debug("refreshing the Redis cache sizes failed: %s: %s", type(exc).__name__, exc)
            return None
        if self.gauges is not None:
            self.gauges.sizes(*sizes)
        return sizes


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


#: Query parameters whose values are secrets (coredis reads `?password=`).
_SECRET_PARAMS = ("pass", "secret", "token")


def redact_url(url: str) -> str:
    """The URL without its password, in the user part or the query, for
    status pages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = "&".join(_redact_param(param) for param in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_param(param: str) -> str:
    name, equals, value = param.partition("=")
    if equals and value and any(word in name.lower() for word in _SECRET_PARAMS):
        return f"{name}=***"
    return param
