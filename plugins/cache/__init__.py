"""The `cache` plugin: an exact-match response cache around the provider call.

The package's modules, one concern each:

- `keys`: the cache key (a sha256 of everything in a request that changes the
  answer) and the policy of what may be cached (temperature);
- `entry`: an answer recorded as it streams by, encoded for a backend, replayed
  as a stream;
- `backend`: the `CacheBackend` protocol every backend implements;
- `memory` and `redis`: the two backends (an in-memory LRU with a byte budget
  and a TTL, and Redis through coredis, shared by several instances);
- this module: the settings, the middleware, the metrics, the admin routes
  (`/admin/cache/status`, `/admin/cache/invalidate`), the readiness check and
  the status panel.

The cache never fails a request: a backend error or a backend that does not
answer within `backend_timeout_seconds` is logged, counted, and the request goes
to the provider. Only answers whose stream ended normally with finish_reason
stop, length or tool_calls are stored; a failed, stopped or disconnected stream
closes the middleware before it reaches the store.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Literal
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from prometheus_client import Counter, Gauge

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    Delta,
    Health,
    InvalidRequest,
    Labelled,
    ModelNotFound,
    Session,
    hookimpl,
    positive,
    read_json,
    require_admin,
)

from .backend import BackendError, CacheBackend
from .entry import Entry, Recorder
from .keys import KEY_PATTERN, bypass_reason, cache_key
from .memory import MemoryBackend
from .redis import RedisBackend, redact_url

__all__ = ["BackendError", "CacheBackend", "CachePlugin", "Settings"]

log = logging.getLogger("streamvisor.plugins.cache")

#: Replay yields to the scheduler after this many chunks, so that a long cached
#: answer does not hold the event loop.
_REPLAY_CHECKPOINT_EVERY = 64
#: A backend error is logged at warning level at most this often per operation
#: (a Redis that is down would otherwise log on every request).
_ERROR_LOG_INTERVAL = 10.0


@attrs.frozen
class Settings:
    #: "memory": this process only; "redis": shared by every instance using the
    #: same redis_url and key_prefix; "auto": "redis" when `[server] redis_url`
    #: is set (the deployment's shared Redis), else "memory".
    backend: Literal["memory", "redis", "auto"] = "auto"
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
    #: The Redis of the redis backend; empty: `[server] redis_url`, else
    #: redis://127.0.0.1:6379/0.
    redis_url: str = ""
    #: Every Redis key of the cache starts with this; instances sharing it share entries.
    key_prefix: str = "streamvisor:cache:"
    #: The longest a request waits for the backend (lookup, store); past it the
    #: operation counts as an error and the request goes on without the cache.
    backend_timeout_seconds: float = attrs.field(default=0.5, validator=positive)
    #: Redis: how often the entries and bytes gauges are refreshed (and expired
    #: entries dropped from the accounting).
    stats_interval_seconds: float = attrs.field(default=15.0, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.backend != "redis" and self.max_entry_bytes > self.max_bytes:
            raise ValueError(f"max_entry_bytes ({self.max_entry_bytes}) must not exceed max_bytes ({self.max_bytes})")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, got {redact_url(self.redis_url)!r}")


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


    def live(self, entries: Callable[[], int], size: Callable[[], int]) -> None:
        self.entries.set_function(entries)
        self.bytes.set_function(size)


# -- the routes' OpenAPI operations ----------------------------------------------------


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ADMIN_ERRORS = {
    "401": _error("A missing or wrong admin key."),
    "403": _error("Admin routes are disabled: STREAMVISOR_ADMIN_KEY is not set."),
    "503": _error("The cache backend failed or did not answer (`cache_backend_unavailable`)."),
}

_COUNT = {"type": ["integer", "null"]}

STATUS_OPENAPI = {
    "summary": "The cache's status",
    "description": "The backend, its entries and size, and the hits, misses, bypasses, stores and errors since start-up.",
    # The scheme GET /openapi.json declares for STREAMVISOR_ADMIN_KEY.
    "security": [{"adminKey": []}],
    "responses": {
        "200": {
            "description": "The status; `reachable` is false (and the sizes null) when the backend did not answer.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["backend", "reachable"],
                        "properties": {
                            "backend": {"enum": ["memory", "redis"]},
                            "reachable": {"type": "boolean"},
                            "error": {"type": ["string", "null"]},
                            "entries": _COUNT,
                            "bytes": _COUNT,
                            "hits": {"type": "integer"},
                            "misses": {"type": "integer"},
                            "bypasses": {"type": "integer"},
                            "stores": {"type": "integer"},
                            "errors": {"type": "integer"},
                            "hit_rate": {"type": ["number", "null"]},
                            "ttl_seconds": {"type": "number"},
                            "max_entry_bytes": {"type": "integer"},
                        },
                    }
                }
            },
        },
        "401": _ADMIN_ERRORS["401"],
        "403": _ADMIN_ERRORS["403"],
    },
}

INVALIDATE_OPENAPI = {
    "summary": "Remove cache entries",
    "description": "Removes every entry, a model's entries (a name the providers know is made canonical, `provider:target`), or one entry by its key (the X-Cache-Key header).",
    "security": [{"adminKey": []}],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "description": "Exactly one of `all`, `model` or `key`.",
                    "oneOf": [
                        {"type": "object", "required": ["all"], "properties": {"all": {"const": True}}, "additionalProperties": False},
                        {"type": "object", "required": ["model"], "properties": {"model": {"type": "string", "minLength": 1}}, "additionalProperties": False},
                        {"type": "object", "required": ["key"], "properties": {"key": {"type": "string", "pattern": KEY_PATTERN.pattern}}, "additionalProperties": False},
                    ],
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "How many entries were removed.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["removed", "scope"],
                        "properties": {
                            "removed": {"type": "integer"},
                            "scope": {"enum": ["all", "model", "key"]},
                            "model": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    }
                }
            },
        },
        "400": _error("Not exactly one of `all`, `model` or `key`, or a bad value (`param` names it)."),
        **_ADMIN_ERRORS,
    },
}


# -- the plugin ----------------------------------------------------------------


class CachePlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend: CacheBackend
        self._last_error_log: dict[str, float] = {}

    def _make_backend(self, shared_redis: str) -> CacheBackend:
        settings = self.settings
        backend = settings.backend
        if backend == "auto":
            backend = "redis" if shared_redis else "memory"
        if backend == "redis":
            return RedisBackend(
                settings.redis_url or shared_redis or "redis://127.0.0.1:6379/0",
                settings.key_prefix,
                settings.ttl_seconds,
                timeout=settings.backend_timeout_seconds,
                stats_interval=settings.stats_interval_seconds,
            )
        return MemoryBackend(settings.max_bytes, settings.ttl_seconds)

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    def register_event_types(self, register, runtime):
        self.runtime = runtime
        # The first hook: the backend depends on the deployment's shared Redis.
        self.backend = self._make_backend(runtime.config.server.redis_url)
        self.metrics = CacheMetrics.create(runtime.metrics, self.backend.name)
        self.backend.watch(self.metrics)
        register("cache_hit", "a cached answer is replayed instead of calling the provider (data: key, backend, age_seconds, chunks)")

    @hookimpl
    def register_services(self, register):
        service = self.backend.service()
        if service is not None:
            register(self.backend.name, service)

    @hookimpl
    async def startup(self):
        if not await self.backend.wait_ready(5):
            log.warning("the %s cache backend was not ready at start-up; requests go uncached until it is", self.backend.name)

    @hookimpl
    def register_middleware(self, register):
        register(self.middleware)

    @hookimpl
    def register_routes(self, register):
        register("/admin/cache/status", require_admin(self._status_view), openapi=STATUS_OPENAPI)
        register("/admin/cache/invalidate", require_admin(self._invalidate_view), methods=("POST",), openapi=INVALIDATE_OPENAPI)

    @hookimpl
    def register_health_checks(self, register):
        register("backend", self.check)

    @hookimpl
    def register_status_panels(self, register):
        register("status", self.status)

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

    def middleware(self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        """A plain function, not an async generator: a request the cache does not
        serve gets the rest of the chain itself, with no layer per chunk."""
        model = key = None
        reason = bypass_reason(request, self.settings.cache_unset_temperature, self.settings.cache_nonzero_temperature)
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
            self.metrics.bypass(reason)
            if reason != "unkeyable":
                session.set_header("X-Cache", "bypass")
            return call_next(request)
        assert model is not None and key is not None  # no reason to bypass: both were made
        return self._through_cache(request, call_next, session, model, key)

    async def _through_cache(
        self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Session, model: str, key: str
    ) -> AsyncIterator[Delta]:
        metrics = self.metrics
        entry = await self._lookup(key)
        if entry is not None:
            metrics.hit()
            session.set_header("X-Cache", "hit")
            session.set_header("X-Cache-Key", key)
            session.emit(
                "cache_hit",
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
        session.set_header("X-Cache", "miss")
        session.set_header("X-Cache-Key", key)
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
        if stored:
            self.metrics.stored()

    # -- readiness and admin -----------------------------------------------------

    async def check(self) -> Health:
        try:
            with trio.fail_after(max(1.0, self.settings.backend_timeout_seconds)):
                return await self.backend.ping()
        except trio.TooSlowError:
            error = "no answer in time"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        # Degraded, still ready: a request without the cache is served all the
        # same, and taking every instance out of a load balancer because their
        # shared Redis went away would turn a slower service into none.
        return Health(True, {"backend": self.backend.name, "error": error, "degraded": "requests are served uncached until the backend answers"})

    async def status(self) -> dict[str, Any]:
        metrics = self.metrics
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
        else:
            metrics.sizes(entries, size)  # a gauge read at scrape time ignores it
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
        return await self.invalidate(await read_json(empty=None))

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
            if not isinstance(value, str) or not KEY_PATTERN.fullmatch(value):
                raise InvalidRequest("'key' must be a cache key: 64 lowercase hex digits (the X-Cache-Key header).", param="key")
            removed = await self._backend_admin("invalidate", self.backend.remove_key, value)
            return {"removed": removed, "scope": "key", "key": value}
        raise InvalidRequest(f"Unknown field '{field}': {usage}.", param=field)
