"""The `health` plugin: liveness and readiness for load balancers and
orchestrators, with no key.

It owns
- `GET /health` (liveness) and `GET /health/ready` (readiness: every check any
  plugin registered with `register_health_checks`, this plugin's included, run
  at once, each under `check_timeout_seconds`);
- the provider prober, a permanent service actor that probes every provider each
  `interval_seconds` (a provider's own `probe()` when it has one, else
  `list_models()`), so readiness answers from a recent probe instead of probing
  on every request;
- two checks: `providers` (every provider reachable at its latest probe) and
  `memory` (the process RSS under `memory_watermark_mb`);
- its status panel `providers`: the latest probe of each provider and the RSS.

Everything here is read-only: nothing a caller of these open routes does can
change the server.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable

import attrs
import orjson
import trio
from prometheus_client import Gauge

from streamvisor.hooks import Health, hookimpl, json_response, not_negative, positive

log = logging.getLogger("streamvisor.plugins.health")

#: Longest error text kept per probe or check (they end up in JSON bodies and logs).
DETAIL_LIMIT = 300


@attrs.frozen
class Settings:
    #: How often every provider is probed.
    interval_seconds: float = attrs.field(default=10.0, validator=positive)
    #: The bound on one provider probe.
    probe_timeout_seconds: float = attrs.field(default=5.0, validator=positive)
    #: The bound on each readiness check when /health/ready runs it.
    check_timeout_seconds: float = attrs.field(default=2.0, validator=positive)
    #: Readiness fails while the process RSS is above this many MiB (0: off).
    memory_watermark_mb: float = attrs.field(default=0.0, validator=not_negative)


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
            # By convention a dict detail may say why in "reason" or "error".
            detail = detail.get("reason") or detail.get("error") or detail
        if detail is None:
            detail = "not ok"
        if not isinstance(detail, str):
            detail = short(orjson.dumps(detail, default=str).decode())
        return f"{self.name}: {detail}"


def short(text: str) -> str:
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def describe(exc: BaseException) -> str:
    message = str(exc)
    return short(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


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


def _as_health(value: Any) -> Health:  # a provider's probe() result
    if isinstance(value, Health):
        return value
    if isinstance(value, bool):
        return Health(value)
    return Health(False, f"the check returned {type(value).__name__}, expected Health or a bool")


def _jsonable(value: Any) -> Any:
    """`value` with whatever orjson cannot encode (a check's odd detail) as a string."""
    return orjson.loads(orjson.dumps(value, default=str))


# -- the routes' OpenAPI operations ---------------------------------------------------

_READINESS = {
    "type": "object",
    "required": ["status", "checks", "reasons"],
    "properties": {
        "status": {"enum": ["ready", "not_ready"]},
        "checks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ok"],
                "properties": {
                    "name": {"type": "string", "description": "PLUGIN:NAME"},
                    "ok": {"type": "boolean"},
                    "detail": {"description": "What the check said (any JSON)."},
                    "duration_ms": {"type": "number"},
                },
            },
        },
        "reasons": {"type": "array", "items": {"type": "string"}, "description": "One line per failed check."},
    },
}

HEALTH_OPENAPI = {
    "summary": "Liveness",
    "description": "Answers while the server runs; no key.",
    "responses": {
        "200": {
            "description": "The server is alive.",
            "content": {"application/json": {"schema": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}},
        }
    },
}

READY_OPENAPI = {
    "summary": "Readiness",
    "description": "Runs every readiness check any plugin registered, at once, each under `check_timeout_seconds`; no key.",
    "responses": {
        "200": {"description": "Every check passed.", "content": {"application/json": {"schema": _READINESS}}},
        "503": {"description": "A check failed (`reasons` says which and why).", "content": {"application/json": {"schema": _READINESS}}},
    },
}


class HealthPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        #: The latest probe of each provider, by provider name.
        self.probes: dict[str, ProbeResult] = {}
        self._rss_bytes: int | None = None
        self._over_watermark = False
        self._stopping = False

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    def register_services(self, register: Callable[..., None], runtime: Any) -> None:
        # The prober may run before `startup`: everything it uses is made here.
        self.runtime = runtime
        self._stopping = False
        self.probes.clear()
        self._upstream_reachable = Gauge(
            "streamvisor_health_upstream_reachable",
            "1 when the latest probe reached the provider, 0 when it did not.",
            ["provider"],
            registry=runtime.metrics,
        )
        self._rss_gauge = Gauge("streamvisor_health_rss_bytes", "The process's resident set size at the latest look.", registry=runtime.metrics)
        register("prober", self.prober, restart="permanent")

    @hookimpl
    def shutdown(self) -> None:
        # Providers are closed after the shutdown hooks; a probe of a closed
        # client would only log a false alarm.
        self._stopping = True

    @hookimpl
    def register_health_checks(self, register: Callable[..., None]) -> None:
        register("providers", self.check_providers)
        register("memory", self.check_memory)

    @hookimpl
    def register_routes(self, register: Callable[..., None]) -> None:
        register("/health", self.health, openapi=HEALTH_OPENAPI)
        register("/health/ready", self.ready, openapi=READY_OPENAPI)

    @hookimpl
    def register_status_panels(self, register: Callable[..., None]) -> None:
        register("providers", self.panel)

    # -- probing ---------------------------------------------------------------------

    async def prober(self) -> None:
        """Every interval: probe every provider, measure memory."""
        while not self._stopping:
            await self.probe_all()
            self.measure_memory()
            await trio.sleep(self.settings.interval_seconds)
        # Returning would make the supervisor restart a permanent child; wait
        # for the runtime to cancel us instead.
        await trio.sleep_forever()

    async def probe_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for provider in self.runtime.providers:
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
            ok, detail = False, f"{method} failed: {describe(exc)}"
        result = ProbeResult(ok, short(detail or ""), method, time.time(), time.monotonic(), round((time.perf_counter() - t0) * 1000, 3))
        previous = self.probes.get(name)
        self.probes[name] = result
        self._upstream_reachable.labels(name).set(1 if ok else 0)
        # Log changes, not every probe: a dead upstream would fill the log. At
        # shutdown, clients being closed under a probe are no news.
        if self._stopping:
            pass
        elif not ok and (previous is None or previous.ok):
            log.warning("provider %r is unreachable: %s", name, result.detail)
        elif ok and previous is not None and not previous.ok:
            log.info("provider %r is reachable again", name)
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
            log.warning("RSS %.1f MiB is above memory_watermark_mb = %g", rss / 2**20, watermark)
        elif not over and self._over_watermark:
            log.info("RSS %.1f MiB is back under memory_watermark_mb = %g", rss / 2**20, watermark)
        self._over_watermark = over
        return rss

    # -- checks ---------------------------------------------------------------------

    async def check_providers(self) -> Health:
        """Every provider reachable at its latest probe; unknown or stale ones are probed now."""
        stale_after = 3 * self.settings.interval_seconds + self.settings.probe_timeout_seconds
        now = time.monotonic()
        providers = list(self.runtime.providers)
        missing = [p for p in providers if p.name not in self.probes or now - self.probes[p.name].monotonic > stale_after]
        if missing:
            async with trio.open_nursery() as nursery:
                for provider in missing:
                    nursery.start_soon(self.probe, provider)
        now = time.monotonic()
        results = {p.name: self.probes[p.name] for p in providers if p.name in self.probes}
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

    async def run_checks(self) -> list[CheckResult]:
        """Every registered check, run by the runtime at once, each under
        `check_timeout_seconds` (a check that raises or hangs counts as a fault
        of its plugin, and as not ready)."""
        results = await self.runtime.check_health(self.settings.check_timeout_seconds)
        return [CheckResult(name, health.ok, health.detail, ms) for name, (health, ms) in results.items()]

    # -- routes and panel -------------------------------------------------------------

    async def health(self) -> Any:
        return {"status": "ok"}

    async def ready(self) -> Any:
        results = await self.run_checks()
        ready = all(r.ok for r in results)
        body = {
            "status": "ready" if ready else "not_ready",
            "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail, "duration_ms": r.duration_ms} for r in results],
            "reasons": [r.reason() for r in results if not r.ok],
        }
        return json_response(_jsonable(body), 200 if ready else 503)

    def panel(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "providers": {name: probe.to_json(now) for name, probe in sorted(self.probes.items())},
            "rss_mb": None if self._rss_bytes is None else round(self._rss_bytes / 2**20, 1),
        }
