"""The session routes: read, list, follow, stop and delete sessions.

A session is looked up in memory first (live, or finished within its retention),
then in the session directory when a plugin offers one (`runtime.directory`:
sessions that run on another server), then in the session store when a plugin
offers one (`runtime.store`). So a session can be read, followed and stopped
through any server, after it left memory, and after a restart.

Following (`GET /v1/sessions/{id}/stream`) sends a session's chunks in the wire
format of its original stream, with the same `id:` values (the chunk's offset),
from the beginning or after `Last-Event-ID` / `?starting_after=N`. A live session
is followed until its end; a finished one is replayed. The first event carries a
`retry:` hint and a comment keeps the connection alive while nothing happens, so
an `EventSource` reconnects on its own and resumes where it was.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any, AsyncIterator

import attrs
import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from . import sse
from .auth import Principal, current_principal
from .chat import Delta, Usage
from .directory import RemoteSession
from .errors import APIError, InvalidRequest, NotFound
from .runtime import Runtime
from .sessions import STATES, Session
from .store import INTERRUPTED, SessionQuery, StoredSession, completion_id, completion_object, decode_cursor, encode_cursor, stored_of
from .web import check_admin, json_response

log = logging.getLogger("streamvisor.http")

#: Sent with the first event of a followed stream: an EventSource reconnects
#: this many milliseconds after losing it.
RETRY_MS = 2000
#: Chunks read from the store per query while replaying.
PAGE = 500
#: How often a follower polls the store for a session that is live elsewhere.
POLL_SECONDS = 0.25
#: How long a follower waits for the store to catch up with a finished session
#: whose last chunks are still being written.
CATCH_UP_SECONDS = 5.0
MAX_LISTED = 100
KEEPALIVE = b": keep-alive\n\n"


class Gone(APIError):
    status = 410
    type = "invalid_request_error"
    code = "session_gone"


def _missing(session_id: str) -> NotFound:
    return NotFound(f"No session with id '{session_id}' (it never existed, or it is older than the retention and no store keeps it).")


async def find(runtime: Runtime, session_id: str, principal: Principal | None = None) -> Session | StoredSession | RemoteSession:
    """The session in memory, else on another server (the directory), else in
    the store; 404, or 410 when the store says it was deleted or purged.
    Another caller's session is a 404 too: the answer never tells whether an id
    exists. The caller is `principal`, else the request's."""
    if principal is None:
        principal = current_principal()
    session = runtime.sessions.find(session_id)
    if session is not None:
        if not principal.sees(session.identity, session.team):
            raise _missing(session_id)
        return session
    directory = runtime.directory
    if directory is not None:
        remote = await directory.find(session_id)
        if remote is not None:
            if not principal.sees(remote.identity, remote.team):
                raise _missing(session_id)
            return remote
    store = runtime.store
    if store is not None:
        stored = await store.get(session_id)
        if stored is not None:
            if not principal.sees(stored.identity, stored.team):
                raise _missing(session_id)
            return stored
        why = await store.gone(session_id)
        if why is not None:
            raise Gone(f"Session '{session_id}' was {why}: its record is no longer kept.")
    raise _missing(session_id)


# -- query parameters --------------------------------------------------------------


def _int_param(value: str | None, name: str, lo: int, hi: int | None = None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    body = text[1:] if text.startswith("-") else text
    if not (body.isascii() and body.isdigit()) or len(body) > 18:
        raise InvalidRequest(f"'{name}' must be an integer, got '{value[:40]}'", param=name)
    number = int(text)
    if number < lo or (hi is not None and number > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise InvalidRequest(f"'{name}' must be an integer {bound}, got {number}", param=name)
    return number


def _time_param(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a time in seconds since the epoch, got '{value[:40]}'", param=name) from None
    if not math.isfinite(number) or number < 0:
        raise InvalidRequest(f"'{name}' must be a time in seconds since the epoch, got '{value[:40]}'", param=name)
    return number


def _name_param(value: str | None, name: str) -> str | None:
    if value is not None and not 1 <= len(value) <= 256:
        raise InvalidRequest(f"'{name}' must be 1 to 256 characters", param=name)
    return value


def start_offset() -> int:
    """Where a follower starts: after `?starting_after=N`, else after the
    `Last-Event-ID` header, else at the beginning."""
    after = _int_param(request.args.get("starting_after"), "starting_after", -1)
    if after is None:
        header = request.headers.get("Last-Event-ID")
        if header is not None and header.strip():
            after = _int_param(header, "Last-Event-ID", -1)
    return 0 if after is None else after + 1


def parse_query() -> SessionQuery:
    args = request.args
    known = {"state", "model", "identity", "since", "until", "limit", "after"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidRequest(f"unknown query parameter '{unknown[0]}'; the filters are: {', '.join(sorted(known))}", param=unknown[0])
    state = args.get("state")
    if state is not None and state not in STATES:
        raise InvalidRequest(f"'state' must be one of {', '.join(STATES)}, got '{state[:40]}'", param="state")
    cursor = args.get("after")
    return SessionQuery(
        state=state,
        model=_name_param(args.get("model"), "model"),
        identity=_name_param(args.get("identity"), "identity"),
        since=_time_param(args.get("since"), "since"),
        until=_time_param(args.get("until"), "until"),
        limit=_int_param(args.get("limit"), "limit", 1, MAX_LISTED) or 20,
        after=None if cursor is None else decode_cursor(cursor),
    )


# -- following ---------------------------------------------------------------------


def _error_of(stored: StoredSession) -> APIError:
    error = stored.error or {}
    return APIError(error.get("message") or "The stream failed.", status=500, type=error.get("type") or "server_error", code=error.get("code"))


async def _follow_memory(session: Session, offset: int, keepalive: float) -> AsyncIterator[Any]:
    """The buffer from `offset`, batch by batch, until the session ends, then
    its end (a `StoredSession`); None when nothing arrived for `keepalive`
    seconds."""
    while True:
        chunks = session.chunks
        end = len(chunks)
        if offset < end:
            yield offset, chunks[offset:end]
            offset = end
        elif session.finished:
            yield stored_of(session)
            return
        else:
            with trio.move_on_after(keepalive) as scope:
                await session._wait_change()
            if scope.cancelled_caught:
                yield None


async def _follow_store(
    runtime: Runtime, session_id: str, offset: int, keepalive: float, until_count: int | None, ended: Session | None = None
) -> AsyncIterator[Any]:
    """The stored chunks from `offset`: batches of (offset, deltas), None as a
    keep-alive, and last the final `StoredSession`, or an `APIError` when the
    stream cannot be completed (it is sent as the stream's error event: the
    response has begun).

    With `until_count` (a session that finished in this process, whose buffer
    was let go) it waits for the store to hold that many chunks: the last ones
    may still be on their way to the database. Without, it follows the stored
    session until it is finished, polling while it runs elsewhere."""
    store = runtime.store
    assert store is not None
    idle = 0.0
    caught_up_by = trio.current_time() + CATCH_UP_SECONDS
    while True:
        try:
            batch = await store.chunks(session_id, offset, PAGE)
            stored = None if until_count is not None else await store.get(session_id)
        except APIError as exc:  # the database went away meanwhile
            yield exc
            return
        if batch:
            yield offset, batch
            offset += len(batch)
            idle = 0.0
            if len(batch) == PAGE:
                continue
        if until_count is not None:
            if offset >= until_count:
                if ended is not None:
                    yield stored_of(ended)
                return
            if trio.current_time() > caught_up_by:
                yield APIError(
                    f"The store holds {offset} of the session's {until_count} chunks; the rest could not be read.",
                    status=503,
                    type="server_error",
                    code="transcript_incomplete",
                )
                return
        else:
            if stored is None:
                yield Gone(f"Session '{session_id}' was deleted while it was followed.")
                return
            if stored.finished:
                if offset >= stored.chunks:
                    yield stored
                    return
                continue
        await trio.sleep(POLL_SECONDS)
        idle += POLL_SECONDS
        if idle >= keepalive:
            idle = 0.0
            yield None


async def chunk_source(runtime: Runtime, found: Session | StoredSession | RemoteSession, offset: int, keepalive: float) -> AsyncIterator[Any]:
    """Where a session's chunks come from, from `offset` on: its buffer, the
    store, or the server that runs it. The iterator gives `(offset, deltas)`
    batches, None after `keepalive` seconds without any, and last its end as a
    `StoredSession` (state, usage, error), or an `APIError` when the rest
    cannot be had. A transcript that is not kept is a 410 here, before
    anything is sent."""
    if isinstance(found, Session):
        session = found
        if session.dropped_chunks == 0:
            return _follow_memory(session, offset, keepalive)
        if runtime.store is not None:
            # Finished, and its buffer let go: the store has (or is about to have) it.
            stored = await runtime.store.get(session.id)
            if stored is not None and stored.transcript != "kept":
                raise Gone(f"Session '{session.id}' has finished and its chunks were not stored (store_content = false).")
            return _follow_store(runtime, session.id, offset, keepalive, until_count=session.chunk_count, ended=session)
        raise Gone(
            f"Session '{session.id}' has finished and its chunks are no longer kept: start a session with "
            "\"background\": true to follow it after its request, or enable the store plugin to replay any session."
        )
    if not isinstance(found, StoredSession):
        # On another server: its directory brings the chunks, and last its end.
        return found.follow(offset, keepalive)
    if found.transcript != "kept":
        why = "was not stored (store_content = false)" if found.transcript == "not_stored" else "was purged (retention)"
        raise Gone(f"The transcript of session '{found.id}' {why}.")
    return _follow_store(runtime, found.id, offset, keepalive, until_count=None)


async def follow(runtime: Runtime, session_id: str) -> Response:
    offset = start_offset()
    found = await find(runtime, session_id)
    keepalive = runtime.config.server.keepalive_seconds
    source = await chunk_source(runtime, found, offset, keepalive)
    if isinstance(found, Session):
        session: Session | None = found
        model, created, include_usage = found.request.model, int(found.created_at), found.request.include_usage
    else:
        session = None
        model, created, include_usage = found.model, int(found.created_at), found.include_usage
    encoder = sse.ChunkEncoder(completion_id(session_id), model, created)
    # The body runs after the view has returned, outside the request context.
    request_id = getattr(g, "request_id", None)

    async def body() -> AsyncIterator[bytes]:
        # The retry hint rides on the first event with data: a client's decoder
        # may take an event without data for a broken one.
        hint = b"retry: %d\n" % RETRY_MS
        end = offset
        stored: StoredSession | None = None
        async for item in source:
            if item is None:
                yield KEEPALIVE
                continue
            if isinstance(item, StoredSession):
                stored = item
                continue
            if isinstance(item, APIError):
                yield hint + sse.error_event(item, request_id)
                return
            start, batch = item
            end = start + len(batch)
            yield hint + encoder.chunks(start, batch)
            hint = b""
        if session is not None:
            error = session.error
            usage: Usage | None = session.usage
            count = session.chunk_count
        else:
            assert stored is not None
            error = _error_of(stored) if stored.state == "failed" else None
            if stored.state == INTERRUPTED:
                error = APIError(
                    "The session was interrupted: the server running it stopped before it finished. This is the output it had reached.",
                    status=500,
                    type="server_error",
                    code="session_interrupted",
                )
            usage, count = stored.usage, max(stored.chunks, end)
        if error is not None:
            yield hint + sse.error_event(error, request_id)
            return
        if include_usage and usage is not None and offset <= count:
            yield hint + encoder.usage(count, usage)
            hint = b""
        yield hint + sse.DONE

    response = Response(
        body(),
        content_type="text/event-stream",
        headers={"X-Session-ID": session_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None
    return response


# -- reading -----------------------------------------------------------------------


async def transcript(runtime: Runtime, found: Session | StoredSession) -> list[Delta]:
    """Every delta of a session, from memory when its buffer is whole, else from the store."""
    if isinstance(found, Session) and found.dropped_chunks == 0:
        return list(found.chunks)
    store = runtime.store
    if store is None:
        raise Gone(f"Session '{found.id}' has finished and its chunks are no longer kept (no store is configured).")
    if isinstance(found, StoredSession) and found.transcript != "kept":
        raise Gone(f"The transcript of session '{found.id}' is not kept ({found.transcript}).")
    deltas: list[Delta] = []
    while True:
        batch = await store.chunks(found.id, len(deltas), PAGE)
        deltas.extend(batch)
        if len(batch) < PAGE:
            return deltas


def scoped(query: SessionQuery, principal: Principal) -> SessionQuery | None:
    """The query a caller may run: the admin key's as asked; a team admin's
    within its team; a key's within its own identity. Without authentication
    (anonymous callers) the list needs the admin key: the ids it gives away
    open every transcript."""
    if principal.is_admin:
        return query
    if not principal.authenticated:
        check_admin()
    if principal.role == "team_admin" and principal.team is not None:
        return attrs.evolve(query, team=principal.team)
    if query.identity is not None and query.identity != principal.identity:
        return None  # someone else's: nothing this caller may see
    return attrs.evolve(query, identity=principal.identity)


def add_session_routes(app: QuartTrio, runtime: Runtime) -> None:
    @app.get("/v1/sessions")
    async def list_sessions() -> Response:
        query = scoped(parse_query(), current_principal())
        if query is None:
            return json_response({"object": "list", "data": [], "has_more": False, "next_cursor": None})
        found: dict[str, tuple[float, str, Session | StoredSession]] = {}
        for session in runtime.sessions:
            if query.selects(session.state, session.model, session.identity, session.created_at, session.id, session.team):
                found[session.id] = (session.created_at, session.id, session)
        if runtime.store is not None:
            for stored in await runtime.store.sessions(attrs.evolve(query, limit=query.limit + 1)):
                # Memory is fresher than the store for a session in both.
                found.setdefault(stored.id, (stored.created_at, stored.id, stored))
        # Only the page is made into JSON, whatever memory holds.
        ordered = heapq.nlargest(query.limit + 1, found.values(), key=lambda item: (item[0], item[1]))
        page, more = ordered[: query.limit], len(ordered) > query.limit
        cursor = encode_cursor(page[-1][0], page[-1][1]) if page and more else None
        return json_response({"object": "list", "data": [item[2].to_json() for item in page], "has_more": more, "next_cursor": cursor})

    @app.get("/v1/sessions/<session_id>")
    async def get_session(session_id: str) -> Response:
        return json_response((await find(runtime, session_id)).to_json())

    @app.get("/v1/sessions/<session_id>/stream")
    async def follow_session(session_id: str) -> Response:
        return await follow(runtime, session_id)

    @app.get("/v1/sessions/<session_id>/completion")
    async def session_completion(session_id: str) -> Response:
        found = await find(runtime, session_id)
        if not isinstance(found, (Session, StoredSession)):
            return json_response(await found.completion())
        deltas = await transcript(runtime, found)
        return json_response(completion_object(found, deltas))

    @app.post("/v1/sessions/<session_id>/stop")
    async def stop_session(session_id: str) -> Response:
        found = await find(runtime, session_id)
        if not isinstance(found, (Session, StoredSession)):
            # A command to the server that runs it; the answer says whether it got there.
            delivered, body = await found.stop()
            body.setdefault("stopped", False)
            body["delivered"] = delivered
            return json_response(body)
        stopped = False
        if isinstance(found, Session):
            stopped = found.cancel("stopped")
            if stopped:
                with trio.move_on_after(5):
                    await found.wait_done()
        body = found.to_json()
        body["stopped"] = stopped
        # Delivered: the session is here, or (in the store) nowhere to send it.
        body["delivered"] = isinstance(found, Session)
        return json_response(body)

    @app.delete("/v1/sessions/<session_id>")
    async def delete_session(session_id: str) -> Response:
        found = await find(runtime, session_id)  # 404 for another caller's, 410 when gone already
        session = runtime.sessions.find(session_id)
        deleted = False
        if not isinstance(found, (Session, StoredSession)):
            deleted = await found.delete()
        if session is not None:
            if session.cancel("stopped"):
                with trio.move_on_after(5):
                    await session.wait_done()
            if not session.finished:
                raise APIError(f"Session '{session_id}' did not stop within 5 s; try again.", status=409, code="session_busy")
            runtime.sessions.remove(session_id)
            deleted = True
        if runtime.store is not None:
            deleted = await runtime.store.delete(session_id) or deleted
        if not deleted:
            await find(runtime, session_id)  # 404, or 410 when it is gone already
            raise NotFound(f"No session with id '{session_id}'.")
        return json_response({"id": session_id, "object": "session.deleted", "deleted": True})
