"""The `admin` plugin: admin routes, health routes and the watchdog.

It owns
- the admin routes (`/admin/status`, `/admin/sessions/status`,
  `/admin/sessions/cleanup`, `/admin/plugins`), each guarded by
  `streamvisor.core.health.require_admin` (a bearer token equal to
  `STREAMVISOR_ADMIN_KEY`; without that variable they answer 403);
- the health routes: `/health` (liveness) and `/health/ready` (readiness: every
  check in `runtime.health_checks`, this plugin's own and other plugins', each
  under a timeout);
- the watchdog, a permanent service actor that stops sessions older than
  `max_session_seconds`, probes every provider, watches the process RSS against
  `memory_watermark_mb`, and records what readiness reports.

Everything here uses the public plugin contract only. The watchdog costs nothing
on a stream's path: it looks at sessions from outside (their chunk counts) rather
than hooking every chunk, so a session's idle time is known to within one
watchdog interval, and is never overestimated.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Any, Awaitable, Callable

import attrs
import orjson
import trio
from prometheus_client import Counter, Gauge
from quart import current_app, request

from streamvisor.core.app import json_response
from streamvisor.core.errors import InvalidRequest
from streamvisor.core.health import ADMIN_KEY_ENV, Health, admin_key, require_admin
from streamvisor.hooks import hookimpl
from streamvisor.config.validators import not_negative, positive

log = logging.getLogger("streamvisor.plugins.admin")

#: The name of this plugin's watchdog under the supervisor is "<plugin>:watchdog".
WATCHDOG = "watchdog"
#: The bound on how long the cleanup route waits for the sessions it cancelled.
CLEANUP_WAIT_SECONDS = 5.0
#: The bound on how long /admin/status waits for the usage plugin's totals.
TOTALS_TIMEOUT_SECONDS = 2.0
#: Longest error text kept per probe or check (they end up in JSON bodies and logs).
DETAIL_LIMIT = 300


@attrs.frozen
class Settings:
    #: How often the watchdog runs: reap, probe, measure memory.
    interval_seconds: float = attrs.field(default=10.0, validator=positive)
    #: A live session older than this is stopped by the watchdog (0: never).
    max_session_seconds: float = attrs.field(default=3600.0, validator=not_negative)
    #: POST /admin/sessions/cleanup cancels live sessions idle longer than this,
    #: unless the request names its own `idle_seconds`.
    idle_seconds: float = attrs.field(default=300.0, validator=not_negative)
    #: The bound on one provider probe.
    probe_timeout_seconds: float = attrs.field(default=5.0, validator=positive)
    #: The bound on each readiness check when /health/ready runs it.
    check_timeout_seconds: float = attrs.field(default=2.0, validator=positive)
    #: Readiness fails while the process RSS is above this many MiB (0: off).
    memory_watermark_mb: float = attrs.field(default=0.0, validator=not_negative)
    #: The bound on the sessions GET /admin/sessions/status lists (oldest first).
    max_listed_sessions: int = attrs.field(default=1000, validator=positive)


@attrs.frozen
class ProbeResult:
    ok: bool
    detail: str
    #: How the provider was probed: "probe()", "GET models" or "list_models()".
    method: str
    #: When the probe finished: wall clock (for people) and monotonic (for ages).
    at: float
    monotonic: float
    latency_ms: float

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "detail": self.detail,
            "method": self.method,
            "checked_at": round(self.at, 3),
            "age_seconds": round(now - self.monotonic, 3),
            "latency_ms": self.latency_ms,
        }


@attrs.frozen
class CheckResult:
    name: str
    ok: bool
    detail: Any
    duration_ms: float

    def reason(self) -> str:
        """One line saying why the check failed, for the body's `reasons`."""
        detail = self.detail
        if isinstance(detail, dict):
            # By convention a dict detail may say why in "reason" (this plugin's
            # checks) or "error" (the cache plugin's).
            detail = detail.get("reason") or detail.get("error") or detail
        if detail is None:
            detail = "not ok"
        if not isinstance(detail, str):
            detail = _short(orjson.dumps(detail, default=str).decode())
        return f"{self.name}: {detail}"


def _short(text: str) -> str:
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return _short(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def read_rss_bytes() -> int | None:
    """The process's resident set size from /proc/self/status (None where there is none)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _as_health(value: Any) -> Health:
    if isinstance(value, Health):
        return value
    if isinstance(value, bool):
        return Health(value)
    return Health(False, f"the check returned {type(value).__name__}, expected Health or a bool")


def _runtime() -> Any:
    return current_app.extensions["streamvisor"]


class AdminPlugin:
    Settings = Settings

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self._started = trio.Event()
        self._stopping = False
        self._started_monotonic = time.monotonic()
        self._started_wall = time.time()
        #: The latest probe of each provider, by provider name.
        self.probes: dict[str, ProbeResult] = {}
        #: session id -> (chunk count, perf_counter time it was first seen at that
        #: count): how idleness is measured without touching the stream's path.
        #: Holds live sessions only (pruned on every look), so it is bounded by
        #: [server] max_live_sessions.
        self._activity: dict[str, tuple[int, float]] = {}
        self._rss_bytes: int | None = None
        self._over_watermark = False

    # -- hooks -----------------------------------------------------------------

    @hookimpl
    def startup(self, runtime: Any) -> None:
        self.runtime = runtime
        self._started_monotonic = time.monotonic()
        self._started_wall = time.time()
        self._upstream_reachable = Gauge(
            "streamvisor_watchdog_upstream_reachable",
            "1 when the watchdog's latest probe reached the provider, 0 when it did not.",
            ["provider"],
            registry=runtime.metrics,
        )
        self._rss_gauge = Gauge(
            "streamvisor_watchdog_rss_bytes",
            "The process's resident set size at the watchdog's latest look.",
            registry=runtime.metrics,
        )
        self._reaped = Counter(
            "streamvisor_admin_ended_sessions",
            "Sessions ended by the watchdog (stale) or by POST /admin/sessions/cleanup (idle, finished).",
            ["reason"],
            registry=runtime.metrics,
        )
        if admin_key() is None:
            log.warning(
                "admin routes (/admin/...) are disabled: set %s to enable them, then send "
                "'Authorization: Bearer <key>'; /health and /health/ready need no key",
                ADMIN_KEY_ENV,
            )
        else:
            log.info("admin routes are enabled (bearer key from %s)", ADMIN_KEY_ENV)
        self._started.set()

    @hookimpl
    def shutdown(self, runtime: Any) -> None:
        # Providers are closed after the shutdown hooks; a probe of a closed
        # client would only log a false alarm.
        self._stopping = True

    @hookimpl
    def register_services(self, register: Callable[..., None]) -> None:
        # Fresh per runtime (an instance may serve several in one process): the
        # watchdog waits for this runtime's startup, not an earlier one's.
        self._started = trio.Event()
        self._stopping = False
        self.probes.clear()
        register(WATCHDOG, self.watchdog, restart="permanent")

    @hookimpl
    def register_health_checks(self, register: Callable[..., None]) -> None:
        register("providers", self.check_providers)
        register("memory", self.check_memory)

    @hookimpl
    def register_routes(self, register: Callable[..., None]) -> None:
        register("/health", self.health)
        register("/health/ready", self.ready)
        register("/admin/status", require_admin(self.admin_status))
        register("/admin/sessions/status", require_admin(self.sessions_status))
        register("/admin/sessions/cleanup", require_admin(self.sessions_cleanup), methods=("POST",))
        register("/admin/plugins", require_admin(self.plugins_status))

    # -- the watchdog ------------------------------------------------------------

    async def watchdog(self) -> None:
        """Every interval: stop stale sessions, note activity, probe, measure memory."""
        await self._started.wait()
        runtime = self.runtime
        while not self._stopping:
            self.reap_stale(runtime)
            self._note_activity(runtime, time.perf_counter())
            await self.probe_all(runtime)
            self.measure_memory()
            await trio.sleep(self.settings.interval_seconds)
        # Returning would make the supervisor restart a permanent child; wait
        # for the runtime to cancel us instead.
        await trio.sleep_forever()

    def reap_stale(self, runtime: Any) -> list[str]:
        limit = self.settings.max_session_seconds
        if not limit:
            return []
        now = time.perf_counter()
        reaped = []
        for session in list(runtime.sessions.sessions.values()):
            age = now - session.t0
            if session.finished or age <= limit:
                continue
            if session.cancel("stopped"):
                reaped.append(session.id)
                self._reaped.labels("stale").inc()
                log.warning(
                    "watchdog: stopped session %s (model %s via %s) after %.1f s, longer than max_session_seconds = %g",
                    session.id,
                    session.model,
                    session.provider,
                    age,
                    limit,
                )
        return reaped

    async def probe_all(self, runtime: Any) -> None:
        async with trio.open_nursery() as nursery:
            for provider in list(runtime.providers.providers.values()):
                nursery.start_soon(self.probe, provider)

    async def probe(self, provider: Any) -> ProbeResult:
        """Probe one provider within `probe_timeout_seconds`; never raises an Exception.

        A provider's own `probe()` wins (the openai upstreams ask `GET models`;
        a provider names what it asks in `probe_method`). Any other provider is
        reachable when `list_models()` succeeds.
        """
        name = provider.name
        t0 = time.perf_counter()
        method = "list_models()"
        ok, detail = False, ""
        try:
            with trio.move_on_after(self.settings.probe_timeout_seconds) as scope:
                own_probe = getattr(provider, "probe", None)
                if callable(own_probe):
                    method = str(getattr(provider, "probe_method", "probe()"))
                    result = await _maybe_await(own_probe())
                    health = Health(True, f"{method} succeeded") if result is None else _as_health(result)
                    ok, detail = health.ok, health.detail if isinstance(health.detail, str) else str(health.detail)
                else:
                    models = await provider.list_models()
                    ok, detail = True, f"list_models() returned {len(models)} model{'' if len(models) == 1 else 's'}"
            if scope.cancelled_caught:
                ok, detail = False, f"no answer within {self.settings.probe_timeout_seconds:g} s ({method})"
        except Exception as exc:  # a probe failure is a result, never a crash
            ok, detail = False, f"{method} failed: {_describe(exc)}"
        result = ProbeResult(
            ok, _short(detail or ""), method, time.time(), time.monotonic(), round((time.perf_counter() - t0) * 1000, 3)
        )
        previous = self.probes.get(name)
        self.probes[name] = result
        self._upstream_reachable.labels(name).set(1 if ok else 0)
        # Log changes, not every probe: a dead upstream would fill the log. At
        # shutdown, clients being closed under a probe are no news.
        if self._stopping:
            pass
        elif not ok and (previous is None or previous.ok):
            log.warning("watchdog: provider %r is unreachable: %s", name, result.detail)
        elif ok and previous is not None and not previous.ok:
            log.info("watchdog: provider %r is reachable again", name)
        return result

    def measure_memory(self) -> int | None:
        rss = read_rss_bytes()
        self._rss_bytes = rss
        if rss is None:
            return None
        self._rss_gauge.set(rss)
        watermark = self.settings.memory_watermark_mb
        over = bool(watermark) and rss > watermark * 1024 * 1024
        if over and not self._over_watermark:
            log.warning("watchdog: RSS %.1f MiB is above memory_watermark_mb = %g", rss / 2**20, watermark)
        elif not over and self._over_watermark:
            log.info("watchdog: RSS %.1f MiB is back under memory_watermark_mb = %g", rss / 2**20, watermark)
        self._over_watermark = over
        return rss

    # -- idleness ----------------------------------------------------------------

    def _note_activity(self, runtime: Any, now: float) -> dict[str, float]:
        """Each live session's last activity (perf_counter time), from its chunk count.

        A session seen with a new count is taken to have had a chunk just now,
        unless the count tells the exact time (no chunk: since it started; one
        chunk: its first token). So idleness may be underestimated by up to the
        time between looks, never overestimated: nothing is cancelled early.
        """
        activity: dict[str, tuple[int, float]] = {}
        last: dict[str, float] = {}
        for session in list(runtime.sessions.sessions.values()):
            if session.finished:
                continue
            count = len(session.chunks)
            seen = self._activity.get(session.id)
            if seen is not None and seen[0] == count:
                at = seen[1]
            elif count == 0:
                at = session.started_at or session.t0
            elif count == 1 and session.first_token_at is not None:
                at = session.first_token_at
            else:
                at = now
            activity[session.id] = (count, at)
            last[session.id] = at
        self._activity = activity
        return last

    # -- health checks -------------------------------------------------------------

    async def check_providers(self) -> Health:
        """Every provider reachable at its latest probe; unknown or stale ones are probed now."""
        runtime = self.runtime
        stale_after = 3 * self.settings.interval_seconds + self.settings.probe_timeout_seconds
        now = time.monotonic()
        missing = [
            provider
            for name, provider in runtime.providers.providers.items()
            if name not in self.probes or now - self.probes[name].monotonic > stale_after
        ]
        if missing:
            async with trio.open_nursery() as nursery:
                for provider in missing:
                    nursery.start_soon(self.probe, provider)
        now = time.monotonic()
        results = {name: self.probes[name] for name in runtime.providers.providers if name in self.probes}
        down = [f"'{name}' ({result.detail})" for name, result in results.items() if not result.ok]
        detail: dict[str, Any] = {"providers": {name: r.to_json(now) for name, r in results.items()}}
        if down:
            detail["reason"] = "unreachable provider" + ("s" if len(down) > 1 else "") + ": " + ", ".join(down)
        return Health(not down, detail)

    async def check_memory(self) -> Health:
        rss = self.measure_memory()
        watermark = self.settings.memory_watermark_mb
        if rss is None:
            return Health(True, {"rss_mb": None, "watermark_mb": watermark, "note": "RSS is not available on this platform"})
        rss_mb = round(rss / 2**20, 1)
        if not watermark:
            return Health(True, {"rss_mb": rss_mb, "watermark_mb": None})
        detail: dict[str, Any] = {"rss_mb": rss_mb, "watermark_mb": watermark}
        over = rss > watermark * 2**20
        if over:
            detail["reason"] = f"memory: RSS {rss_mb} MiB is above the watermark of {watermark:g} MiB"
        return Health(not over, detail)

    async def run_checks(self, runtime: Any) -> list[CheckResult]:
        """Run every registered check at once, each under `check_timeout_seconds`."""
        checks = dict(runtime.health_checks)
        results: dict[str, CheckResult] = {}
        timeout = self.settings.check_timeout_seconds

        async def run(name: str, check: Callable[[], Awaitable[Any]]) -> None:
            t0 = time.perf_counter()
            ok: bool
            detail: Any
            try:
                with trio.move_on_after(timeout) as scope:
                    health = _as_health(await _maybe_await(check()))
                    ok, detail = health.ok, health.detail
                if scope.cancelled_caught:
                    ok, detail = False, f"did not answer within {timeout:g} s"
            except Exception as exc:  # a broken check means not ready, with the reason
                ok, detail = False, f"raised {_describe(exc)}"
            results[name] = CheckResult(name, ok, detail, round((time.perf_counter() - t0) * 1000, 3))

        async with trio.open_nursery() as nursery:
            for name, check in checks.items():
                nursery.start_soon(run, name, check)
        return [results[name] for name in checks]

    # -- health routes ---------------------------------------------------------------

    async def health(self) -> Any:
        return {"status": "ok"}

    async def ready(self) -> Any:
        results = await self.run_checks(_runtime())
        ready = all(r.ok for r in results)
        body = {
            "status": "ready" if ready else "not_ready",
            "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail, "duration_ms": r.duration_ms} for r in results],
            "reasons": [r.reason() for r in results if not r.ok],
        }
        return json_response(_jsonable(body), 200 if ready else 503)

    # -- admin routes ------------------------------------------------------------------

    async def admin_status(self) -> Any:
        runtime = _runtime()
        now = time.monotonic()
        models: dict[str, list[str]] = {name: [] for name in runtime.providers.providers}
        for model in runtime.providers.models():
            models.setdefault(runtime.providers.resolve(model.id).provider.name, []).append(model.id)
        providers = []
        for name, served in models.items():
            probe = self.probes.get(name)
            providers.append({"name": name, "models": served, "probe": None if probe is None else probe.to_json(now)})
        retained = sum(1 for s in list(runtime.sessions.sessions.values()) if s.finished)
        return json_response(
            _jsonable(
                {
                    "uptime_seconds": round(now - self._started_monotonic, 3),
                    "started_at": round(self._started_wall, 3),
                    "sessions": {"live": runtime.sessions.live, "retained": retained},
                    "providers": providers,
                    "models": [m.id for m in runtime.providers.models()],
                    "rss_mb": None if self._rss_bytes is None else round(self._rss_bytes / 2**20, 1),
                    **await self._usage_totals(runtime),
                }
            )
        )

    async def _usage_totals(self, runtime: Any) -> dict[str, Any]:
        """The usage plugin's `totals()`, or why there are none."""
        loaded = runtime.plugins.plugins.get("usage")
        totals = getattr(getattr(loaded, "plugin", None), "totals", None)
        if loaded is None:
            return {"usage": None, "usage_note": "the usage plugin is not enabled"}
        if not callable(totals):
            return {"usage": None, "usage_note": "the usage plugin has no totals()"}
        try:
            with trio.move_on_after(TOTALS_TIMEOUT_SECONDS) as scope:
                value = await _maybe_await(totals())
            if scope.cancelled_caught:
                return {"usage": None, "usage_note": f"the usage plugin's totals() took longer than {TOTALS_TIMEOUT_SECONDS:g} s"}
        except Exception as exc:
            log.exception("the usage plugin's totals() failed")
            return {"usage": None, "usage_note": f"the usage plugin's totals() failed: {_describe(exc)}"}
        if attrs.has(type(value)):
            value = attrs.asdict(value)
        return {"usage": value}

    async def sessions_status(self) -> Any:
        runtime = _runtime()
        now = time.perf_counter()
        last = self._note_activity(runtime, now)
        everything = list(runtime.sessions.sessions.values())
        live = sorted((s for s in everything if not s.finished), key=lambda s: s.t0)
        by_state: dict[str, int] = {}
        for session in everything:
            by_state[session.state] = by_state.get(session.state, 0) + 1
        limit = self.settings.max_listed_sessions
        listed = [self._session_json(s, now, last.get(s.id)) for s in live[:limit]]
        return json_response(
            {
                "sessions": listed,
                "counts": {
                    "live": runtime.sessions.live,
                    "retained": len(everything) - len(live),
                    "by_state": by_state,
                    "listed": len(listed),
                    "truncated": len(live) > limit,
                },
            }
        )

    @staticmethod
    def _session_json(session: Any, now: float, last_activity: float | None) -> dict[str, Any]:
        usage = session.usage
        return {
            "id": session.id,
            "request_id": session.request_id,
            "state": session.state,
            "model": session.model,
            "provider": session.provider,
            "identity": session.identity,
            "detached": session.detached,
            "created": int(session.created),
            "age_seconds": round(now - session.t0, 3),
            "idle_seconds": None if last_activity is None else round(max(0.0, now - last_activity), 3),
            "chunks": session.chunk_count,
            "usage": None if usage is None else usage.to_json(),
        }

    async def sessions_cleanup(self) -> Any:
        runtime = _runtime()
        body = await _json_body()
        idle_limit = _number_param(body, "idle_seconds", self.settings.idle_seconds)
        remove_finished = _bool_param(body, "finished", True)
        cancel_idle = _bool_param(body, "idle", True)

        now = time.perf_counter()
        everything = list(runtime.sessions.sessions.values())
        # Decided before cancelling: a session cancelled now stays in retention,
        # so its partial usage can still be read (GET /v1/sessions/{id}).
        finished = [s for s in everything if s.finished] if remove_finished else []
        last = self._note_activity(runtime, now)
        cancelled = []
        if cancel_idle:
            for session in everything:
                at = last.get(session.id)
                if session.finished or at is None or now - at <= idle_limit:
                    continue
                if session.cancel("stopped"):
                    cancelled.append((session, round(now - at, 3)))
                    self._reaped.labels("idle").inc()
                    log.info("cleanup: stopped session %s, idle for %.1f s", session.id, now - at)
        with trio.move_on_after(CLEANUP_WAIT_SECONDS):
            for session, _ in cancelled:
                await session.wait_done()

        removed = []
        for session in finished:
            if runtime.sessions.sessions.pop(session.id, None) is not None:
                removed.append({**_summary(session), "reason": "finished"})
                self._reaped.labels("finished").inc()
        return json_response(
            {
                "idle_seconds": idle_limit,
                "cancelled": [{**_summary(s), "reason": "idle", "idle_seconds": idle} for s, idle in cancelled],
                "removed": removed,
                "counts": {"cancelled": len(cancelled), "removed": len(removed)},
            }
        )

    async def plugins_status(self) -> Any:
        runtime = _runtime()
        listeners: dict[str, Any] = {}
        for stats in runtime.events.stats:
            listeners[stats.plugin] = stats
        children = dict(runtime.supervisor.children)
        plugins = []
        for loaded in runtime.plugins:
            services = {
                name.removeprefix(f"{loaded.name}:"): {
                    "starts": child.starts,
                    "crashes": child.crashes,
                    "running": child.running,
                    "last_error": child.last_error,
                }
                for name, child in children.items()
                if name.startswith(f"{loaded.name}:")
            }
            listener = listeners.get(loaded.name)
            crashes = sum(s["crashes"] for s in services.values())
            errors = {
                "listener_errors": listener.errors if listener else 0,
                "listener_dropped": listener.dropped if listener else 0,
                "service_crashes": crashes,
            }
            plugins.append(
                {
                    "name": loaded.name,
                    "version": loaded.version,
                    "origin": loaded.origin,
                    "hooks": loaded.hooks,
                    "errors": {**errors, "total": sum(errors.values())},
                    "listener": None
                    if listener is None
                    else {"delivered": listener.delivered, "errors": listener.errors, "dropped": listener.dropped},
                    "services": services,
                }
            )
        return json_response({"plugins": plugins})


def _summary(session: Any) -> dict[str, Any]:
    return {
        "id": session.id,
        "state": session.state,
        "model": session.model,
        "provider": session.provider,
        "identity": session.identity,
        "usage": None if session.usage is None else session.usage.to_json(),
    }


async def _json_body() -> dict[str, Any]:
    """The request's JSON object, or {} for an empty body."""
    data = await request.get_data(cache=False)
    if not data or not data.strip():
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def _number_param(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"'{name}' must be a number of seconds, 0 or more, got {value!r}", param=name)
    return float(value)


def _bool_param(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _jsonable(value: Any) -> Any:
    """`value` with whatever orjson cannot encode (a check's odd detail) as a string."""
    return orjson.loads(orjson.dumps(value, default=str))
