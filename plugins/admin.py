"""The `admin` plugin: keyed routes to look at and tidy a running server, and
the watchdog.

It owns
- the admin routes (`/admin/status`, `/admin/sessions/status`,
  `/admin/sessions/cleanup`, `/admin/plugins`), each guarded by `require_admin`
  (a bearer token equal to `STREAMVISOR_ADMIN_KEY`; without that variable they
  answer 403);
- the watchdog, a permanent service actor that stops sessions older than
  `max_session_seconds`.

`/admin/status` shows every plugin's status panels (`register_status_panels`):
usage totals, cache state, circuits, probes, or a third party's own, without
this plugin knowing any of them by name. Liveness and readiness are the `health`
plugin's, on open routes.

The watchdog costs nothing on a stream's path: it looks at sessions from outside
(their chunk counts) rather than hooking every chunk, so a session's idle time is
known to within one look, and is never overestimated.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import attrs
import orjson
import trio
from prometheus_client import Counter

from streamvisor.hooks import (
    ADMIN_KEY_ENV,
    InvalidRequest,
    Session,
    admin_key,
    hookimpl,
    json_response,
    not_negative,
    positive,
    read_json,
    require_admin,
)

log = logging.getLogger("streamvisor.plugins.admin")

#: The bound on how long the cleanup route waits for the sessions it cancelled.
CLEANUP_WAIT_SECONDS = 5.0


@attrs.frozen
class Settings:
    #: How often the watchdog looks for stale sessions.
    interval_seconds: float = attrs.field(default=10.0, validator=positive)
    #: A live session older than this is stopped by the watchdog (0: never).
    max_session_seconds: float = attrs.field(default=3600.0, validator=not_negative)
    #: POST /admin/sessions/cleanup cancels live sessions idle longer than this,
    #: unless the request names its own `idle_seconds`.
    idle_seconds: float = attrs.field(default=300.0, validator=not_negative)
    #: The bound on each status panel when /admin/status gathers them.
    panel_timeout_seconds: float = attrs.field(default=2.0, validator=positive)
    #: The bound on the sessions GET /admin/sessions/status lists (oldest first).
    max_listed_sessions: int = attrs.field(default=1000, validator=positive)


# -- the routes' OpenAPI operations ---------------------------------------------------


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _admin_operation(summary: str, description: str, body: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An operation of a keyed route: the bearer scheme, and its 401 and 403."""
    return {
        "summary": summary,
        "description": description,
        # The scheme GET /openapi.json declares for STREAMVISOR_ADMIN_KEY.
        "security": [{"adminKey": []}],
        **more,
        "responses": {
            "200": {"description": summary + ".", "content": {"application/json": {"schema": body}}},
            **({"400": _error("The body is not what the route takes (`param` names the field).")} if "requestBody" in more else {}),
            "401": _error("A missing or wrong admin key."),
            "403": _error(f"Admin routes are disabled: {ADMIN_KEY_ENV} is not set."),
        },
    }


_SESSION_SUMMARY = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string"},
        "model": {"type": "string"},
        "provider": {"type": "string"},
        "identity": {"type": "string"},
        "usage": {"type": ["object", "null"]},
        "reason": {"enum": ["idle", "finished"]},
        "idle_seconds": {"type": "number"},
    },
}

STATUS_OPENAPI = _admin_operation(
    "The server's status",
    "Uptime, session counts, providers and models, and every plugin's status panels.",
    {
        "type": "object",
        "required": ["uptime_seconds", "sessions", "providers", "models", "panels"],
        "properties": {
            "uptime_seconds": {"type": "number"},
            "started_at": {"type": "number"},
            "sessions": {"type": "object", "properties": {"live": {"type": "integer"}, "retained": {"type": "integer"}}},
            "providers": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "models": {"type": "array", "items": {"type": "string"}}}},
            },
            "models": {"type": "array", "items": {"type": "string"}},
            "panels": {"type": "object", "description": "{plugin: {panel: value}}", "additionalProperties": {"type": "object"}},
        },
    },
)

SESSIONS_STATUS_OPENAPI = _admin_operation(
    "Live sessions",
    "The live sessions, oldest first (at most `max_listed_sessions`), with their age and idle time, and counts by state.",
    {
        "type": "object",
        "required": ["sessions", "counts"],
        "properties": {
            "sessions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "request_id": {"type": "string"},
                        "state": {"type": "string"},
                        "model": {"type": "string"},
                        "provider": {"type": "string"},
                        "identity": {"type": "string"},
                        "created": {"type": "integer"},
                        "age_seconds": {"type": "number"},
                        "idle_seconds": {"type": ["number", "null"]},
                        "chunks": {"type": "integer"},
                        "usage": {"type": ["object", "null"]},
                    },
                },
            },
            "counts": {
                "type": "object",
                "properties": {
                    "live": {"type": "integer"},
                    "retained": {"type": "integer"},
                    "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "listed": {"type": "integer"},
                    "truncated": {"type": "boolean"},
                },
            },
        },
    },
)

CLEANUP_OPENAPI = _admin_operation(
    "Clean up sessions",
    "Cancels live sessions idle for longer than `idle_seconds` and forgets finished ones; the body (optional) says what to do.",
    {
        "type": "object",
        "required": ["idle_seconds", "cancelled", "removed", "counts"],
        "properties": {
            "idle_seconds": {"type": "number"},
            "cancelled": {"type": "array", "items": _SESSION_SUMMARY},
            "removed": {"type": "array", "items": _SESSION_SUMMARY},
            "counts": {"type": "object", "properties": {"cancelled": {"type": "integer"}, "removed": {"type": "integer"}}},
        },
    },
    requestBody={
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "idle_seconds": {
                            "type": ["number", "null"],
                            "minimum": 0,
                            "description": "Cancel live sessions idle for longer than this (default: the `idle_seconds` setting).",
                        },
                        "idle": {"type": ["boolean", "null"], "default": True, "description": "Cancel idle live sessions."},
                        "finished": {"type": ["boolean", "null"], "default": True, "description": "Forget finished sessions kept for retention."},
                    },
                }
            }
        },
    },
)

PLUGINS_OPENAPI = _admin_operation(
    "The loaded plugins",
    "Each plugin in plugins.toml order: version, origin, contract, hooks, services, listener, errors and faults.",
    {
        "type": "object",
        "required": ["plugins"],
        "properties": {
            "plugins": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": ["string", "null"]},
                        "origin": {"type": "string"},
                        "contract": {"type": ["string", "null"]},
                        "hooks": {"type": "array", "items": {"type": "string"}},
                        "errors": {"type": "object"},
                        "faults": {"type": "object"},
                        "listener": {"type": ["object", "null"]},
                        "services": {"type": "object"},
                    },
                },
            }
        },
    },
)


class AdminPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self._started_monotonic = time.monotonic()
        self._started_wall = time.time()
        #: session id -> (chunk count, perf_counter time it was first seen at that
        #: count): how idleness is measured without touching the stream's path.
        #: Holds live sessions only (pruned on every look), so it is bounded by
        #: [server] max_live_sessions.
        self._activity: dict[str, tuple[int, float]] = {}

    # -- hooks -----------------------------------------------------------------

    @hookimpl
    def register_services(self, register: Callable[..., None], runtime: Any) -> None:
        self.runtime = runtime
        register("watchdog", self.watchdog, restart="permanent")

    @hookimpl
    def startup(self, runtime: Any) -> None:
        self._started_monotonic = time.monotonic()
        self._started_wall = time.time()
        self._ended = Counter(
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

    @hookimpl
    def register_routes(self, register: Callable[..., None]) -> None:
        register("/admin/status", require_admin(self.admin_status), openapi=STATUS_OPENAPI)
        register("/admin/sessions/status", require_admin(self.sessions_status), openapi=SESSIONS_STATUS_OPENAPI)
        register("/admin/sessions/cleanup", require_admin(self.sessions_cleanup), methods=("POST",), openapi=CLEANUP_OPENAPI)
        register("/admin/plugins", require_admin(self.plugins_status), openapi=PLUGINS_OPENAPI)

    # -- the watchdog ------------------------------------------------------------

    async def watchdog(self) -> None:
        """Every interval: stop stale sessions."""
        while True:
            await trio.sleep(self.settings.interval_seconds)
            self.reap_stale()

    def reap_stale(self) -> list[str]:
        limit = self.settings.max_session_seconds
        if not limit:
            return []
        now = time.perf_counter()
        reaped = []
        for session in self.runtime.sessions.live():
            age = now - session.created_mono
            if age <= limit:
                continue
            if session.cancel("stopped"):
                reaped.append(session.id)
                self._ended.labels("stale").inc()
                log.warning(
                    "watchdog: stopped session %s (model %s via %s) after %.1f s, longer than max_session_seconds = %g",
                    session.id, session.model, session.provider, age, limit,
                )
        return reaped

    # -- idleness ----------------------------------------------------------------

    def _note_activity(self, now: float) -> dict[str, float]:
        """Each live session's last activity (perf_counter time), from its chunk count.

        A session seen with a new count is taken to have had a chunk just now,
        unless the count tells the exact time (no chunk: since it started; one
        chunk: its first token). So idleness may be underestimated by up to the
        time between looks, never overestimated: nothing is cancelled early.
        """
        activity: dict[str, tuple[int, float]] = {}
        last: dict[str, float] = {}
        for session in self.runtime.sessions.live():
            count = session.chunk_count
            seen = self._activity.get(session.id)
            if seen is not None and seen[0] == count:
                at = seen[1]
            elif count == 0:
                at = session.started_mono or session.created_mono
            elif count == 1 and session.first_token_mono is not None:
                at = session.first_token_mono
            else:
                at = now
            activity[session.id] = (count, at)
            last[session.id] = at
        self._activity = activity
        return last

    # -- routes ------------------------------------------------------------------

    async def admin_status(self) -> Any:
        runtime = self.runtime
        now = time.monotonic()
        providers = [{"name": p.name, "models": [m.id for m in runtime.providers.models_of(p.name)]} for p in runtime.providers]
        return json_response(
            _jsonable({
                "uptime_seconds": round(now - self._started_monotonic, 3),
                "started_at": round(self._started_wall, 3),
                "sessions": {"live": runtime.sessions.live_count, "retained": runtime.sessions.retained_count},
                "providers": providers,
                "models": [m.id for m in runtime.providers.models()],
                "panels": await runtime.status_panels(self.settings.panel_timeout_seconds),
            })
        )

    async def sessions_status(self) -> Any:
        runtime = self.runtime
        now = time.perf_counter()
        last = self._note_activity(now)
        live = runtime.sessions.live()
        retained = runtime.sessions.retained()
        by_state: dict[str, int] = {}
        for session in live + retained:
            by_state[session.state] = by_state.get(session.state, 0) + 1
        limit = self.settings.max_listed_sessions
        listed = [self._session_json(s, now, last.get(s.id)) for s in live[:limit]]
        return json_response(
            {
                "sessions": listed,
                "counts": {
                    "live": len(live),
                    "retained": len(retained),
                    "by_state": by_state,
                    "listed": len(listed),
                    "truncated": len(live) > limit,
                },
            }
        )

    @staticmethod
    def _session_json(session: Session, now: float, last_activity: float | None) -> dict[str, Any]:
        usage = session.usage
        return {
            "id": session.id,
            "request_id": session.request_id,
            "state": session.state,
            "model": session.model,
            "provider": session.provider,
            "identity": session.identity,
            "created": int(session.created_at),
            "age_seconds": round(now - session.created_mono, 3),
            "idle_seconds": None if last_activity is None else round(max(0.0, now - last_activity), 3),
            "chunks": session.chunk_count,
            "usage": None if usage is None else usage.to_json(),
        }

    async def sessions_cleanup(self) -> Any:
        runtime = self.runtime
        body = await read_json(empty={})
        if not isinstance(body, dict):
            raise InvalidRequest(f"The request body must be a JSON object, got {type(body).__name__}.")
        idle_limit = _number_param(body, "idle_seconds", self.settings.idle_seconds)
        remove_finished = _bool_param(body, "finished", True)
        cancel_idle = _bool_param(body, "idle", True)

        now = time.perf_counter()
        # Decided before cancelling: a session cancelled now stays in retention,
        # so its partial usage can still be read (GET /v1/sessions/{id}).
        finished = runtime.sessions.retained() if remove_finished else []
        last = self._note_activity(now)
        cancelled = []
        if cancel_idle:
            for session in runtime.sessions.live():
                at = last.get(session.id)
                if at is None or now - at <= idle_limit:
                    continue
                if session.cancel("stopped"):
                    cancelled.append((session, round(now - at, 3)))
                    self._ended.labels("idle").inc()
                    log.info("cleanup: stopped session %s, idle for %.1f s", session.id, now - at)
        with trio.move_on_after(CLEANUP_WAIT_SECONDS):
            for session, _ in cancelled:
                await session.wait_done()

        removed = []
        for session in finished:
            if runtime.sessions.remove(session.id):
                removed.append({**_summary(session), "reason": "finished"})
                self._ended.labels("finished").inc()
        return json_response(
            {
                "idle_seconds": idle_limit,
                "cancelled": [{**_summary(s), "reason": "idle", "idle_seconds": idle} for s, idle in cancelled],
                "removed": removed,
                "counts": {"cancelled": len(cancelled), "removed": len(removed)},
            }
        )

    async def plugins_status(self) -> Any:
        return json_response({"plugins": self.runtime.plugin_status()})


def _jsonable(value: Any) -> Any:
    """`value` with whatever orjson cannot encode (a panel's odd value) as text."""
    return orjson.loads(orjson.dumps(value, default=str))


def _summary(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "state": session.state,
        "model": session.model,
        "provider": session.provider,
        "identity": session.identity,
        "usage": None if session.usage is None else session.usage.to_json(),
    }


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
