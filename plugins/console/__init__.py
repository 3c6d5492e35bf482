"""The `console` plugin: a web page where operators see every live stream,
stop it, and read what it said.

`/console` serves server-rendered pages whose small script modules read the
console's own JSON and SSE routes (`/console/api/...`); its assets are files of
this package, and nothing is loaded from the internet. Signing in takes the
admin key (everything) or an API key (its identity's sessions only): see
auth.py. The live page is pushed over SSE by one hub for all viewers
(live.py), which reads the sessions' buffers once per tick and costs the
streams nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from quart import Response, current_app, redirect, request, send_from_directory

from streamvisor.hooks import (
    ANONYMOUS,
    APIError,
    ChatRequest,
    Event,
    InvalidRequest,
    NotFound,
    Principal,
    Session,
    SessionQuery,
    admin_key,
    StoredSession,
    hookimpl,
    json_response,
    listens_to,
    positive,
    read_json,
    stored_of,
)

from . import pages
from .auth import COOKIE, Signer, describe
from .live import Hub

log = logging.getLogger("streamvisor.console")

__all__ = ["ConsolePlugin", "Settings"]

STATIC = Path(__file__).parent / "static"
#: The usage windows: (seconds, bucket seconds).
WINDOWS = {"1h": (3600, 60), "24h": (86400, 900), "30d": (30 * 86400, 6 * 3600)}
#: Sessions whose events (retries, fallbacks, cache hits) are kept for their page.
NOTED_SESSIONS = 10_000
#: History rows per page.
HISTORY_PAGE = 50
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@attrs.frozen
class Settings:
    #: How often the live page is updated (all changes of a tick in one message).
    tick_ms: int = attrs.field(default=250, validator=positive)
    #: A sign-in lasts this long.
    session_hours: float = attrs.field(default=12.0, validator=positive)
    #: The key cookies are signed with; by default derived from the admin key
    #: (so every instance with the same admin key accepts the same cookies).
    secret: str = ""
    #: "auto": Secure cookies over https and on loopback addresses; "always"; "never".
    secure_cookies: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "always", "never")))
    #: Concurrent live-page viewers at most (each holds an SSE connection).
    max_viewers: int = attrs.field(default=100, validator=positive)


class ConsolePlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer = Signer(settings.secret)
        self.runtime: Any = None
        self.hub: Hub | None = None
        self.version = str(int(time.time()))
        #: Session id -> what its events said (bounded: NOTED_SESSIONS).
        self._notes: dict[str, list[dict[str, Any]]] = {}

    # -- hooks ------------------------------------------------------------------------------

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        self.hub = Hub(runtime, self.settings.tick_ms / 1000)
        page = {"summary": "A page of the console (HTML)", "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}
        # The page `streamvisor serve` names last, for a person to open.
        register("/console", self.index, openapi={**page, "x-streamvisor-page": "console (sign in with the admin key or an API key)"})
        register("/console/login", self.login_page, openapi=page)
        register("/console/login", self.login, methods=("POST",), openapi=_form("Sign in to the console with the admin key or an API key"))
        register("/console/logout", self.logout, methods=("POST",), openapi=_form("Sign out of the console"))
        register("/console/live", self.live_page, openapi=page)
        register("/console/sessions/<session_id>", self.session_page, openapi=page)
        register("/console/models", self.models_page, openapi=page)
        register("/console/usage", self.usage_page, openapi=page)
        register("/console/keys", self.keys_page, openapi=page)
        register("/console/playground", self.playground_page, openapi=page)
        register("/console/static/<path:name>", self.static, openapi={"summary": "The console's scripts and styles", "responses": {"200": {"description": "a file"}}})
        register("/console/api/feed", self.feed, openapi=_api("The live sessions, pushed as they change (SSE)", "text/event-stream"))
        register("/console/api/history", self.history, openapi=_api("Finished sessions, newest first"))
        register("/console/api/sessions/<session_id>", self.session_data, openapi=_api("A session with its request and output"))
        register("/console/api/sessions/<session_id>/stream", self.session_stream, openapi=_api("A session's output as it grows (SSE)", "text/event-stream"))
        register("/console/api/sessions/<session_id>/stop", self.stop, methods=("POST",), openapi=_api("Stop a session"))
        register("/console/api/models", self.models_data, openapi=_api("Providers, models, readiness checks and plugins"))
        register("/console/api/usage", self.usage_data, openapi=_api("Usage over a window, in time buckets, by model, key, outcome or identity"))
        register("/console/api/usage.csv", self.usage_csv, openapi=_api("The same usage as CSV", "text/csv"))
        register("/console/api/keys", self.keys_data, openapi=_api("API keys with their spend and budget (the keys plugin's)"))
        register("/console/api/keys", self.create_key, methods=("POST",), openapi=_api("Create an API key (the admin's)"))
        register("/console/api/keys/<key_id>", self.update_key, methods=("PATCH",), openapi=_api("Change a key's limits or budget (the admin's)"))
        register("/console/api/keys/<key_id>", self.revoke_key, methods=("DELETE",), openapi=_api("Revoke a key (the admin's)"))
        register("/console/api/keys/<key_id>/rotate", self.rotate_key, methods=("POST",), openapi=_api("Give a key a new secret (the admin's)"))
        register("/console/api/chat", self.chat, methods=("POST",), openapi=_api("The playground: a chat completion streamed as the console's events (SSE)", "text/event-stream"))

    @hookimpl
    def register_services(self, register: Any) -> None:
        assert self.hub is not None
        register("live", self.hub.run)

    @hookimpl
    @listens_to(exclude=("created", "started", "first_token", "chunk", "completed", "failed", "stopped", "disconnected"))
    def on_event(self, event: Event) -> None:
        """What happened to a session besides its chunks (retries, fallbacks, a
        cache hit, any plugin's session events): kept for its page, for the
        last `NOTED_SESSIONS` sessions that had any."""
        if not event.session_id:
            return
        notes = self._notes.get(event.session_id)
        if notes is None:
            notes = self._notes[event.session_id] = []
            while len(self._notes) > NOTED_SESSIONS:
                del self._notes[next(iter(self._notes))]
        if len(notes) < 50:
            notes.append({"type": event.type, "at": round(event.at, 3), **{k: v for k, v in event.data.items() if isinstance(v, (str, int, float, bool)) or v is None}})

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("viewers", lambda: {"live_viewers": len(self.hub.viewers) if self.hub else 0})

    # -- who is signed in -------------------------------------------------------------------

    def principal(self) -> Principal | None:
        return self.signer.read(request.cookies.get(COOKIE), self.settings.session_hours * 3600)

    def _require(self) -> Principal:
        principal = self.principal()
        if principal is None:
            raise APIError("Sign in to the console first.", status=401, type="invalid_request_error", code="not_signed_in")
        return principal

    def _check_action(self) -> Principal:
        """An action (a POST): signed in, the CSRF token, and no other site's Origin."""
        principal = self._require()
        origin = request.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != request.host:
            raise APIError("This request came from another site.", status=403, type="permission_error", code="csrf_failed")
        token = request.headers.get("X-CSRF-Token")
        if not self.signer.csrf_ok(request.cookies.get(COOKIE, ""), token):
            raise APIError("The console's CSRF token is missing or wrong: reload the page.", status=403, type="permission_error", code="csrf_failed")
        return principal

    def _secure(self) -> bool:
        mode = self.settings.secure_cookies
        if mode != "auto":
            return mode == "always"
        forwarded = request.headers.get("X-Forwarded-Proto", "")
        return request.scheme == "https" or forwarded == "https" or request.host.rsplit(":", 1)[0] in _LOOPBACK

    def _html(self, title: str, body: str, principal: Principal | None, current: str = "", scripts: tuple[str, ...] = (), vendor: tuple[str, ...] = ()) -> Response:
        cookie = request.cookies.get(COOKIE, "")
        text = pages.layout(
            title, body, who=None if principal is None else describe(principal), csrf=self.signer.csrf(cookie) if cookie else "",
            current=current, scripts=scripts, version=self.version, vendor=vendor,
        )
        return Response(text, content_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    def _to_login(self) -> Response:
        target = urllib.parse.quote(request.full_path.rstrip("?"), safe="/?=&")
        return redirect(f"/console/login?next={target}")

    # -- pages ---------------------------------------------------------------------------

    async def index(self) -> Response:
        return redirect("/console/live" if self.principal() is not None else "/console/login")

    def _no_keys(self) -> bool:
        """Nothing to sign in with: no admin key, and no plugin that authenticates."""
        return admin_key() is None and not self.runtime.authenticates

    async def login_page(self) -> Response:
        return self._html("Sign in", pages.login(next_path=_safe_next(request.args.get("next")), no_keys=self._no_keys()), None)

    async def login(self) -> Response:
        form = await request.form
        key = (form.get("key") or "").strip()
        target = _safe_next(form.get("next"))
        if not key:
            return self._refused("Enter a key.", target)
        try:
            principal = await self.runtime.authenticate({"Authorization": f"Bearer {key}"}, "/console")
        except APIError as exc:
            return self._refused(exc.message, target)
        if principal is ANONYMOUS or not principal.authenticated:
            # Without keys every caller is anonymous: only the admin key signs in.
            return self._refused("That is not a key this server knows. Without API keys, sign in with the admin key.", target)
        response = redirect(target, 303)
        response.set_cookie(
            COOKIE, self.signer.issue(principal), max_age=int(self.settings.session_hours * 3600), httponly=True,
            samesite="Strict", secure=self._secure(), path="/console",
        )
        log.info("console: %s signed in", describe(principal))
        return response

    def _refused(self, message: str, target: str) -> Response:
        text = pages.layout("Sign in", pages.login(message, target, no_keys=self._no_keys()), who=None, version=self.version)
        return Response(text, status=401, content_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    async def logout(self) -> Response:
        form = await request.form
        cookie = request.cookies.get(COOKIE, "")
        if cookie and not self.signer.csrf_ok(cookie, form.get("csrf")):
            raise APIError("The console's CSRF token is missing or wrong: reload the page.", status=403, type="permission_error", code="csrf_failed")
        response = redirect("/console/login", 303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    async def live_page(self) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html("Live", pages.live(), principal, "/console/live", ("live.js",))

    async def session_page(self, session_id: str) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html(f"Session {session_id}", pages.session(session_id), principal, "", ("session.js",))

    async def models_page(self) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html("Models and plugins", pages.models(), principal, "/console/models", ("models.js",))

    async def usage_page(self) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html("Usage", pages.usage(), principal, "/console/usage", ("usage.js",), vendor=("uPlot.min.css", "uPlot.iife.min.js"))

    async def keys_page(self) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html("Keys", pages.keys(principal.is_admin), principal, "/console/keys", ("keys.js",))

    async def playground_page(self) -> Response:
        principal = self.principal()
        if principal is None:
            return self._to_login()
        return self._html("Playground", pages.playground(), principal, "/console/playground", ("playground.js",))

    async def static(self, name: str) -> Response:
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC.resolve()) or not path.is_file():
            raise NotFound(f"No console file '{name}'.")
        response = await send_from_directory(STATIC, name)
        response.headers["Cache-Control"] = "public, max-age=86400"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # -- data ----------------------------------------------------------------------------

    async def feed(self) -> Response:
        principal = self._require()
        hub = self.hub
        assert hub is not None
        if len(hub.viewers) >= self.settings.max_viewers:
            raise APIError(f"The console has {self.settings.max_viewers} live viewers already (max_viewers).", status=503, type="server_error", code="overloaded", headers={"Retry-After": "5"})
        viewer = hub.join(principal)
        keepalive = self.runtime.config.server.keepalive_seconds

        async def events() -> Any:
            try:
                yield _sse(hub.snapshot(principal))
                viewer.stale = False
                while True:
                    with trio.move_on_after(keepalive):
                        message = await viewer.receive.receive()
                        yield _sse(message)
                        continue
                    yield b": keepalive\n\n"
            finally:
                hub.leave(viewer)

        return _stream(events())

    async def history(self) -> Response:
        principal = self._require()
        args = request.args
        state, model, identity = args.get("state") or None, args.get("model") or None, args.get("identity") or None
        after = None
        if args.get("after"):
            at, _, after_id = args["after"].partition("|")
            try:
                after = (float(at), after_id)
            except ValueError:
                raise InvalidRequest("'after' is not a cursor this console gave out", param="after") from None
        query = SessionQuery(state=state, model=model, identity=identity, limit=HISTORY_PAGE, after=after)
        if principal.role == "member" or principal.role == "anonymous":
            query = attrs.evolve(query, identity=principal.identity)
        elif principal.role == "team_admin":
            query = attrs.evolve(query, team=principal.team)
        rows: list[StoredSession] = []
        store = self.runtime.store
        if store is not None:
            rows = await store.sessions(query)
        else:
            kept = [s for s in self.runtime.sessions.retained() if principal.sees(s.identity, s.team)]
            kept.sort(key=lambda s: (s.created_at, s.id), reverse=True)
            rows = [stored_of(s) for s in kept if query.selects(s.state, s.request.model, s.identity, s.created_at, s.id, s.team)][:HISTORY_PAGE]
        rows = [r for r in rows if r.finished]
        data = [_history_row(r) for r in rows]
        cursor = f"{rows[-1].created_at!r}|{rows[-1].id}" if len(rows) == HISTORY_PAGE else None
        return json_response({"object": "list", "data": data, "next": cursor})

    async def session_data(self, session_id: str) -> Response:
        principal = self._require()
        found = await self.runtime.find_session(session_id, principal)
        body = found.to_json()
        messages = None
        if isinstance(found, Session):
            messages = list(found.request.messages)
            body["headers"] = {k: v for k, v in found.headers.items() if k.lower().startswith("x-")}
        else:
            read = getattr(self.runtime.store, "request_of", None)
            if read is not None and isinstance(found, StoredSession):
                kept = await read(session_id)
                messages = None if kept is None else kept.get("messages")
        body["messages"] = messages
        body["events"] = self._notes.get(session_id, [])
        body["live"] = not found.finished if hasattr(found, "finished") else False
        return json_response(body)

    async def session_stream(self, session_id: str) -> Response:
        principal = self._require()
        found = await self.runtime.find_session(session_id, principal)
        raw = request.args.get("offset", "0") or "0"
        if not (raw.isascii() and raw.isdigit()):
            raise InvalidRequest(f"'offset' must be a number of chunks, got '{raw[:40]}'", param="offset")
        offset = int(raw)
        source = await self.runtime.follow_session(found, offset)

        async def events() -> Any:
            async for batch in source:
                if batch is None:
                    yield b": keepalive\n\n"
                elif isinstance(batch, tuple):
                    start, deltas = batch
                    content = "".join(d.content or "" for d in deltas)
                    reasoning = "".join(d.reasoning or "" for d in deltas)
                    yield _sse({"type": "delta", "offset": start + len(deltas), "content": content, "reasoning": reasoning})
                elif isinstance(batch, APIError):
                    yield _sse({"type": "error", "message": batch.message, "code": batch.code})
                    return
                else:
                    yield _sse({"type": "end", "session": batch.to_json()})
                    return

        return _stream(events())

    async def models_data(self) -> Response:
        principal = self._require()
        may_use = getattr(principal, "may_use", None)
        providers = []
        for provider in self.runtime.providers:
            names = [m.id for m in self.runtime.providers.models_of(provider.name)]
            providers.append({"name": provider.name, "models": [n for n in names if may_use is None or may_use(n)]})
        body: dict[str, Any] = {"providers": providers}
        if principal.is_admin:
            # Readiness, circuits and plugins are the operator's: the admin's only.
            checks = await self.runtime.check_health()
            body["health"] = [{"check": name, "ok": bool(health.ok), "ms": round(ms, 1), "detail": health.detail} for name, (health, ms) in checks.items()]
            body["plugins"] = self.runtime.plugin_status()
            panels = await self.runtime.status_panels()
            body["circuits"] = {name: panel for plugin in panels.values() for key, value in plugin.items() if key == "circuits" and isinstance(value, dict) for name, panel in value.items()}
        return json_response(orjson.loads(orjson.dumps(body, default=str)))

    async def _usage(self) -> tuple[dict[str, Any], str, str]:
        principal = self._require()
        window = request.args.get("window", "1h")
        if window not in WINDOWS:
            raise InvalidRequest(f"'window' is one of {', '.join(WINDOWS)}", param="window")
        by = request.args.get("by", "model")
        if by not in ("model", "key_id", "outcome", "identity"):
            raise InvalidRequest("'by' is one of model, key_id, outcome, identity", param="by")
        seconds, bucket = WINDOWS[window]
        series = getattr(self.runtime.store, "usage_series", None)
        if series is None:
            raise APIError("Usage over time needs a store that keeps the usage ledger (the store plugin).", status=501, type="server_error", code="no_store")
        until = time.time()
        # Buckets on round times, the last one holding now.
        since = (until // bucket + 1) * bucket - seconds
        identity = team = None
        if principal.role in ("member", "anonymous"):
            identity = principal.identity
        elif principal.role == "team_admin":
            team = principal.team
        rows = await series(since, until, bucket, by, identity=identity, team=team)
        return {"window": window, "by": by, "since": since, "until": until, "bucket_seconds": bucket, "rows": rows}, window, by

    async def usage_data(self) -> Response:
        body, _, _ = await self._usage()
        return json_response(body)

    async def usage_csv(self) -> Response:
        body, window, by = await self._usage()
        lines = [f"bucket_start_utc,{by},sessions,prompt_tokens,completion_tokens,reasoning_tokens,cost_usd"]
        for row in body["rows"]:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["at"]))
            group = str(row["group"] if row["group"] is not None else "")
            if any(c in group for c in ',"\n'):
                group = '"' + group.replace('"', '""') + '"'
            lines.append(f"{stamp},{group},{row['sessions']},{row['prompt_tokens']},{row['completion_tokens']},{row['reasoning_tokens']},{row['cost_usd']:.6f}")
        return Response(
            "\n".join(lines) + "\n", content_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="streamvisor-usage-{window}-by-{by}.csv"', "Cache-Control": "no-store"},
        )

    # -- keys: through the keys plugin's admin API ------------------------------------------

    async def _admin_api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call an admin route of this server in-process, with the admin key: the
        keys plugin's API is its contract, so the console uses it like any client."""
        key = admin_key()
        if key is None:
            raise APIError("Managing keys needs STREAMVISOR_ADMIN_KEY.", status=403, type="permission_error", code="admin_disabled")
        client = current_app.test_client()
        response = await client.open(path, method=method, headers={"Authorization": f"Bearer {key}"}, json=body)
        data = await response.get_json(force=True, silent=True)
        return response.status_code, data

    def _relay(self, status: int, data: Any) -> Response:
        if status == 404 and isinstance(data, dict) and data.get("error", {}).get("code") in (None, "not_found", "route_not_found"):
            return json_response({"error": {"message": "API keys need the keys plugin ([plugins.keys]).", "type": "invalid_request_error", "code": "keys_disabled"}}, 404)
        return json_response(data, status)

    async def keys_data(self) -> Response:
        principal = self._require()
        if not principal.is_admin:
            if principal.key_id is None:
                return json_response({"object": "list", "data": [], "admin": False})
            status, data = await self._admin_api("GET", f"/admin/keys/{urllib.parse.quote(principal.key_id)}")
            if status != 200:
                return self._relay(status, data)
            return json_response({"object": "list", "data": [data], "admin": False})
        status, listed = await self._admin_api("GET", "/admin/keys?limit=100")
        if status != 200:
            return self._relay(status, listed)
        shown = []
        for key in listed["data"]:
            # Each key's spend and budget: the list leaves them out.
            status, data = await self._admin_api("GET", f"/admin/keys/{urllib.parse.quote(key['id'])}")
            shown.append(data if status == 200 else key)
        return json_response({"object": "list", "data": shown, "admin": True, "has_more": listed.get("has_more", False)})

    def _admin_action(self) -> Principal:
        principal = self._check_action()
        if not principal.is_admin:
            raise APIError("Only the admin manages keys.", status=403, type="permission_error", code="admin_only")
        return principal

    async def create_key(self) -> Response:
        principal = self._admin_action()
        status, data = await self._admin_api("POST", "/admin/keys", await read_json())
        if status == 201:
            log.info("console: %s created key %s for %s", describe(principal), data.get("id"), data.get("identity"))
        return self._relay(status, data)

    async def update_key(self, key_id: str) -> Response:
        self._admin_action()
        return self._relay(*await self._admin_api("PATCH", f"/admin/keys/{urllib.parse.quote(key_id)}", await read_json()))

    async def revoke_key(self, key_id: str) -> Response:
        principal = self._admin_action()
        log.info("console: %s revoked key %s", describe(principal), key_id)
        return self._relay(*await self._admin_api("DELETE", f"/admin/keys/{urllib.parse.quote(key_id)}"))

    async def rotate_key(self, key_id: str) -> Response:
        principal = self._admin_action()
        log.info("console: %s rotated key %s", describe(principal), key_id)
        return self._relay(*await self._admin_api("POST", f"/admin/keys/{urllib.parse.quote(key_id)}/rotate"))

    async def chat(self) -> Response:
        """The playground's request: a chat completion started as the signed-in
        caller (`runtime.start_chat`, so the caller's key, limits and budget
        apply), streamed as console events: `start` (the session id), `delta`s,
        and `end` with usage, cost and the time to the first token."""
        principal = self._check_action()
        body = await read_json()
        if not isinstance(body, dict):
            raise InvalidRequest("The body is a chat completion request.")
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        chat = ChatRequest.from_openai(body)
        chat = attrs.evolve(
            chat, request_id=f"console-{secrets.token_hex(8)}", session_id=f"sess_{secrets.token_hex(12)}",
            identity=principal.identity, team=principal.team, key_id=principal.key_id,
        )
        session, _ = await self.runtime.start_chat(chat, principal)

        async def events() -> Any:
            finished = False
            try:
                yield _sse({"type": "start", "session_id": session.id, "model": chat.model})
                async for deltas in session.follow(0):
                    content = "".join(d.content or "" for d in deltas)
                    reasoning = "".join(d.reasoning or "" for d in deltas)
                    if content or reasoning:
                        yield _sse({"type": "delta", "content": content, "reasoning": reasoning})
                await session.wait_done()
                finished = True
                yield _sse({"type": "end", "session": session.to_json()})
            finally:
                if not finished:
                    session.cancel("disconnected")
                session.release()

        return _stream(events())

    async def stop(self, session_id: str) -> Response:
        principal = self._check_action()
        found = await self.runtime.find_session(session_id, principal)
        if isinstance(found, Session):
            stopped = found.cancel("stopped")
        elif hasattr(found, "stop"):
            stopped, _ = await found.stop()
        else:
            stopped = False
        log.info("console: %s stopped session %s", describe(principal), session_id)
        return json_response({"id": session_id, "stopped": bool(stopped)})


def _safe_next(value: str | None) -> str:
    """Only a path of the console: never another site (an open redirect)."""
    if value and value.startswith("/console") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/live"


def _sse(message: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(message) + b"\n\n"


def _stream(events: Any) -> Response:
    response = Response(events, content_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    response.timeout = None
    return response


def _history_row(stored: StoredSession) -> dict[str, Any]:
    usage = stored.usage
    return {
        "id": stored.id,
        "model": stored.model,
        "identity": stored.identity,
        "team": stored.team,
        "state": stored.state,
        "created_at": stored.created_at,
        "tokens": None if usage is None else usage.completion_tokens,
        "duration_ms": stored.timings.get("duration_ms"),
        "cost_usd": None if usage is None else usage.cost_usd,
    }


#: Pages are never framed by another site, and load nothing from elsewhere.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _form(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {"303": {"description": "Redirected"}, "401": {"description": "Refused"}}}


def _api(summary: str, content: str = "application/json") -> dict[str, Any]:
    return {
        "summary": summary,
        "description": "Needs the console's sign-in cookie (docs/plugins/console.md).",
        "responses": {"200": {"description": "OK", "content": {content: {}}}, "401": {"description": "Not signed in"}},
    }
