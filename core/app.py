"""The HTTP app: core routes of the OpenAI-compatible API on quart-trio.

Every response carries `X-Request-ID` (the client's when it sent a sane one) and
`Server-Timing`; every error, whatever raised it, leaves as the OpenAI error
envelope. Streaming responses have quart's response timeout switched off (it would
cut a stream at 60 s) and are bound to their session: when the client goes away,
the handler is cancelled and the session is cancelled with it.

`GET /openapi.json` describes every route, plugin routes included (core/openapi.py).
Plugin routes are added after the core routes. An exception from a plugin's view
that is not an `APIError` is a fault of that plugin: counted, logged, and
answered with a 500 envelope like any other. A plugin route may have a body
limit of its own (`max_body_bytes`); core/body.py enforces every route's.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import attrs
import orjson
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import openapi, sse
from .auth import current_principal
from .body import BoundedHTTPConnection, BoundedRequest, RequestBody
from .chat import ChatRequest
from .errors import APIError, InternalError, MethodNotAllowed, NotFound, PayloadTooLarge
from .logs import request_id_var, session_id_var
from .metrics import Labelled
from .runtime import Runtime
from .session_api import add_session_routes
from .sessions import Session, new_id
from .web import json_response, read_json

log = logging.getLogger("streamvisor.http")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def error_response(error: APIError) -> Response:
    return json_response(error.body(getattr(g, "request_id", None)), error.status, error.headers)


def _http_error(exc: HTTPException) -> APIError:
    code = exc.code or 500
    if code == 404:
        return NotFound(f"No route for {request.method} {request.path}.")
    if code == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
    if code == 413:
        # The rest of the body was never read: the connection cannot carry another
        # request, and a client that reused it would wait forever.
        return PayloadTooLarge(
            f"The request body is larger than the limit of {request.max_content_length} bytes.",
            headers={"Connection": "close"},
        )
    if code == 408:
        return APIError("The request body took too long to arrive.", status=408, code="request_timeout")
    if code < 500:
        return APIError(exc.description or exc.name, status=code, code=exc.name.lower().replace(" ", "_"))
    return InternalError("The server failed to handle the request.")


def create_app(runtime: Runtime) -> QuartTrio:
    # No static folder: quart would serve /static/<path:filename>, a route
    # nobody asked for and that /openapi.json would have to describe.
    app = QuartTrio("streamvisor.core.app", root_path=str(Path(__file__).parent), static_folder=None)
    # Bodies are bounded per route (core/body.py): until the route is known,
    # by the largest limit any route has; then by the route's own.
    app.request_class = BoundedRequest
    app.asgi_http_class = BoundedHTTPConnection
    default_limit = runtime.config.server.max_body_bytes
    body_limits = {_endpoint(route): route.max_body_bytes for route in runtime.routes if route.max_body_bytes is not None}
    app.config["MAX_CONTENT_LENGTH"] = max([default_limit, *body_limits.values()])
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["streamvisor"] = runtime

    http_requests = Labelled(runtime.http_requests)

    @app.before_request
    async def start_request() -> None:
        g.t0 = time.perf_counter()
        limit = default_limit
        if body_limits and request.url_rule is not None:
            limit = body_limits.get(request.url_rule.endpoint, default_limit)
        request.max_content_length = limit
        if isinstance(request.body, RequestBody):
            request.body.limit_to(limit)
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request_id_var.set(g.request_id)
        if request.path == "/v1" or request.path.startswith("/v1/"):
            # Every /v1 route, core's and plugins' alike, has a principal: the
            # authenticators' answer (a 401 ends the request here).
            g.principal = await runtime.authenticate(request.headers, request.path)

    @app.after_request
    async def finish_request(response: Response) -> Response:
        request_id = getattr(g, "request_id", None)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        if response.status_code >= 400 and (request.content_length or "Transfer-Encoding" in request.headers):
            # A refusal (401, 404, 405, ...) may come before the body has arrived,
            # and hypercorn then neither reuses nor closes the connection: the
            # client's next request on it would wait forever.
            response.headers["Connection"] = "close"
        t0 = getattr(g, "t0", None)
        if t0 is not None:
            elapsed = (time.perf_counter() - t0) * 1000
            response.headers["Server-Timing"] = f"total;dur={elapsed:.2f}"
            rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
            http_requests(request.method, rule, str(response.status_code)).observe(elapsed / 1000)
            if response.status_code >= 500:
                log.warning("%s %s -> %d in %.1f ms", request.method, request.path, response.status_code, elapsed)
            else:
                log.info("%s %s -> %d in %.1f ms", request.method, request.path, response.status_code, elapsed)
        return response

    @app.errorhandler(APIError)
    async def api_error(error: APIError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return error_response(_http_error(exc))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        return error_response(InternalError("The server failed to handle the request."))

    @app.get("/v1/models")
    async def list_models() -> Response:
        may_use = current_principal().may_use
        models = [m.to_openai() for m in runtime.providers.models() if may_use is None or may_use(m.id)]
        return json_response({"object": "list", "data": models})

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        chat = ChatRequest.from_openai(await read_json())
        principal = current_principal()
        chat = attrs.evolve(
            chat, request_id=g.request_id, session_id=new_id("sess_"), identity=principal.identity, team=principal.team, key_id=principal.key_id,
            trace_headers=trace_context(request.headers),
        )
        session, admitted = await runtime.start_chat(chat, principal)
        session_id_var.set(session.id)
        if chat.background and not chat.stream:
            # Detached: the client collects it later (GET /v1/sessions/{id},
            # /completion, /stream). Nothing waits here, nothing cancels it.
            return json_response(
                session.to_json(), 202, headers={**admitted, "X-Session-ID": session.id, "Location": f"/v1/sessions/{session.id}"}
            )
        handed_off = False
        try:
            await session.wait_first()
            # Plugins may have set headers (X-Cache, ...) before the first chunk.
            headers = {**admitted, **session.headers, "X-Session-ID": session.id}
            if chat.background:
                headers["Location"] = f"/v1/sessions/{session.id}"
            if session.error is not None and not session.chunks:
                # Nothing reached the client: a plain error status is honest. A
                # copy is raised: the session keeps its error without the
                # traceback of this handler.
                error = copy.copy(session.error)
                error.headers = {**error.headers, **headers}
                raise error
            completion_id = f"chatcmpl-{session.id.removeprefix('sess_')}"
            created = int(session.created_at)
            if not chat.stream:
                await session.wait_done()
                if session.error is not None:
                    raise copy.copy(session.error)
                usage = session.usage
                assert usage is not None
                return json_response(
                    sse.completion(completion_id, chat.model, created, session.chunks, session.finish_reason, usage),
                    headers=headers,
                )
            encoder = sse.ChunkEncoder(completion_id, chat.model, created)
            response = Response(
                _stream(session, encoder, chat.include_usage),
                content_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            response.timeout = None  # quart would cut the stream after RESPONSE_TIMEOUT (60 s)
            handed_off = True
            return response
        finally:
            # A background session outlives its request, and keeps its buffer
            # for followers until its retention ends.
            if not handed_off and not chat.background:
                session.cancel("disconnected")
                session.release()

    add_session_routes(app, runtime)

    # The plugins registered their routes before the app is made: the document
    # is complete now, and encoded once.
    document = orjson.dumps(openapi.build(runtime.routes))

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(document, content_type="application/json")

    for route in runtime.routes:
        app.add_url_rule(
            route.path,
            endpoint=_endpoint(route),
            view_func=_plugin_view(runtime, route.plugin, route.view),
            methods=list(route.methods),
        )
    return app


def trace_context(headers: Any) -> dict[str, str]:
    """The W3C trace context of a request's headers (`traceparent`, and
    `tracestate` with it), when it is well-formed enough to pass on."""
    parent = headers.get("traceparent", "")
    if not parent or len(parent) > 128 or not _TRACEPARENT.fullmatch(parent):
        return {}
    out = {"traceparent": parent}
    state = headers.get("tracestate", "")
    if state and len(state) <= 512 and "\n" not in state and "\r" not in state:
        out["tracestate"] = state
    return out


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _endpoint(route: Any) -> str:
    return f"{route.plugin}:{route.path}:{','.join(route.methods)}"


def _where() -> str:
    """The route being served, as a fault's place (only on the failure path)."""
    return f"route {request.method} {request.url_rule.rule if request.url_rule else request.path}"


#: What a quart view may return.
_VIEW_RESULTS = (Response, dict, list, str, bytes, tuple)


def _plugin_view(runtime: Runtime, plugin: str, view: Callable[..., Any]) -> Callable[..., Any]:
    timeout = runtime.config.server.route_timeout_seconds

    @functools.wraps(view)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            with trio.move_on_after(timeout) as scope:
                # body_chunks() moves the deadline on as the body arrives.
                g.streamvisor_route_deadline = (scope, timeout)
                result = await view(*args, **kwargs)
                if not isinstance(result, _VIEW_RESULTS):
                    raise TypeError(f"the view returned {type(result).__name__}, which is not a response")
                return result
        except (APIError, HTTPException):
            raise
        except Exception as exc:
            runtime.faults.record(plugin, _where(), exc)
            raise InternalError("The server failed to handle the request.") from None
        where = _where()
        runtime.faults.record(plugin, where, TimeoutError(f"no answer within {timeout:g} s"), log_it=False)
        log.warning("plugin %r's %s did not answer within route_timeout_seconds (%g s)", plugin, where, timeout)
        raise APIError(f"The request took longer than {timeout:g} s.", status=504, type="server_error", code="route_timeout")

    return guarded


async def _stream(session: Session, encoder: sse.ChunkEncoder, include_usage: bool) -> AsyncIterator[bytes]:
    offset = 0
    try:
        async for batch in session.follow(0):
            yield encoder.chunks(offset, batch)
            offset += len(batch)
        if session.error is not None:
            yield sse.error_event(session.error, session.request_id)
            return
        if include_usage and session.usage is not None:
            yield encoder.usage(offset, session.usage)
        yield sse.DONE
    finally:
        # Runs when the stream ends, and when the client disconnected and quart
        # cancelled the handler: then the session is cancelled too. cancel()
        # does not await, so the cancelled scope is no trap. A background session
        # goes on without its client.
        if not session.background:
            if not session.finished:
                session.cancel("disconnected")
            session.release()
