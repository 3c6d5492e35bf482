"""The `responses` plugin: OpenAI's Responses API (`/v1/responses`) in front of
every model streamvisor serves.

A response *is* a session: `POST /v1/responses` turns the request into a
`ChatRequest` and starts it with `runtime.start_chat`, exactly as `POST
/v1/chat/completions` does, so the cache, retries, keys and limits, events,
usage, the store and the cluster all apply, and there is no second pipeline.
The response id is the session id under another prefix (`resp_<hex>` is
`sess_<hex>`), so nothing maps one to the other.

What the plugin adds is the wire format (`wire.py`): the response object and
its streaming events, with sequence numbers that are a pure function of the
session's deltas. That is what makes resuming work anywhere: `GET
/v1/responses/{id}?stream=true&starting_after=N` replays the session's chunks
from wherever they are (memory, another instance, the store;
`runtime.follow_session`), regenerates the events, and sends those after N.

Conversations (`previous_response_id`) need each response's input: it is kept
as a record in the store (`RecordStore`, kind `responses:response`), or in
this process's memory (bounded) without one. The previous response's output
is read from its session's transcript.
"""

from __future__ import annotations

import collections
import copy
import logging
import time
from typing import Any, AsyncIterator

import attrs
import orjson
import trio
from quart import Response, g, request

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    Delta,
    InvalidRequest,
    NotFound,
    RecordStore,
    Session,
    StoredSession,
    current_principal,
    hookimpl,
    json_response,
    positive,
    read_json,
)

from . import wire

log = logging.getLogger("streamvisor.responses")

__all__ = ["ResponsesPlugin", "Settings"]

RECORD_KIND = "responses:response"
#: Session states and what a response's status is then.
_CANCELLED = ("stopped", "disconnected", "shutdown")
#: The request fields this API understands (others are refused, by name).
_KNOWN = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "metadata", "stream", "background", "store",
    "previous_response_id", "user", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning", "truncation", "stream_options",
    "include", "service_tier", "prompt_cache_key", "safety_identifier",
}
_ROLES = {"user", "assistant", "system", "developer"}


@attrs.frozen
class Settings:
    #: Responses whose input is kept in this process's memory at most, when no
    #: store keeps records (for `previous_response_id`).
    max_memory_records: int = attrs.field(default=10_000, validator=positive)
    #: With a store: records are written in batches, at most this long after
    #: their response started ...
    flush_interval_ms: int = attrs.field(default=50, validator=positive)
    #: ... and at most this many wait (while the database is away); past it the
    #: oldest are dropped, and counted.
    max_pending_records: int = attrs.field(default=100_000, validator=positive)


def session_id_of(response_id: str) -> str:
    if not response_id.startswith("resp_") or len(response_id) > 64:
        raise NotFound(f"No response with id '{response_id[:80]}'.")
    return "sess_" + response_id[5:]


async def _find(runtime: Any, response_id: str) -> Any:
    """The session behind a response; a deleted or purged one is a 404 here,
    as the Responses API answers for a deleted response."""
    try:
        return await runtime.find_session(session_id_of(response_id))
    except APIError as exc:
        if exc.status == 410:
            raise NotFound(f"No response with id '{response_id}' (it was deleted).") from None
        raise


def response_id_of(session_id: str) -> str:
    return "resp_" + session_id.removeprefix("sess_")


class ResponsesPlugin:
    Settings = Settings
    streamvisor_contract = "1.4"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self._memory: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._pending: dict[str, dict[str, Any]] = {}
        self._record_store: Any = False
        self._writing: dict[str, dict[str, Any]] = {}
        self._wake = trio.Event()
        self.dropped_records = 0

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        register("/v1/responses", self.create_view, methods=("POST",), openapi=_op("Create a response (the Responses API)"))
        register("/v1/responses/<response_id>", self.retrieve_view, openapi=_op("A response; with ?stream=true its events, after starting_after"))
        register("/v1/responses/<response_id>/cancel", self.cancel_view, methods=("POST",), openapi=_op("Cancel a response (idempotent)"))
        register("/v1/responses/<response_id>", self.delete_view, methods=("DELETE",), openapi=_op("Delete a response"))

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("records", self.run_records)

    @hookimpl
    async def shutdown(self) -> None:
        # What is still pending: written once more before the store closes.
        records = self._records()
        if records is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        put_many = getattr(records, "put_records", None)
        try:
            if put_many is not None:
                await put_many(RECORD_KIND, list(pending.items()))
            else:
                for response_id, data in pending.items():
                    await records.put_record(RECORD_KIND, response_id, data)
        except Exception as exc:
            log.warning("responses: %d records were not written at shutdown (%s)", len(pending), exc)

    # -- records: the input of each response, for previous_response_id -----------------------
    #
    # One record per stored response. Written in batches by the `records`
    # service (one transaction per `flush_interval_ms`), not on the request's
    # path: one transaction per request cost as much CPU as the rest of the
    # response (measured: 1.4 ms of 3.6 ms at concurrency 32). Until a batch is
    # written its records are read from `_pending`.

    def _records(self) -> RecordStore | None:
        # Asked once: isinstance() against a Protocol checks every method.
        if self._record_store is False:
            store = self.runtime.store
            self._record_store = store if isinstance(store, RecordStore) else None
        return self._record_store  # type: ignore[return-value]

    def _keep(self, response_id: str, data: dict[str, Any]) -> None:
        if self._records() is not None:
            pending = self._pending
            if len(pending) >= self.settings.max_pending_records:
                del pending[next(iter(pending))]
                self.dropped_records += 1
            pending[response_id] = data
            if not self._wake.is_set():
                self._wake.set()
            return
        self._memory[response_id] = data
        while len(self._memory) > self.settings.max_memory_records:
            self._memory.popitem(last=False)

    async def _record(self, response_id: str) -> dict[str, Any] | None:
        data = self._pending.get(response_id) or self._writing.get(response_id)
        if data is None:
            records = self._records()
            data = await records.get_record(RECORD_KIND, response_id) if records is not None else self._memory.get(response_id)
        if data is None or data.get("deleted"):
            return None
        return data

    async def run_records(self) -> None:
        """Write the kept records in batches; a failed batch is tried again."""
        records = self._records()
        if records is None:
            await trio.sleep_forever()  # kept in memory: nothing to write
        put_many = getattr(records, "put_records", None)
        backoff = self.settings.flush_interval_ms / 1000
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._writing, self._pending = self._pending, {}
            try:
                if put_many is not None:
                    await put_many(RECORD_KIND, list(self._writing.items()))
                else:
                    for response_id, data in self._writing.items():
                        await records.put_record(RECORD_KIND, response_id, data)
                backoff = self.settings.flush_interval_ms / 1000
            except Exception as exc:
                log.warning("responses: %d records could not be written (%s); trying again", len(self._writing), exc)
                # Newer ones (written meanwhile) win over the ones that failed.
                self._pending = {**self._writing, **self._pending}
                self._wake.set()
                backoff = min(5.0, backoff * 2)
            finally:
                self._writing = {}
            await trio.sleep(backoff)

    # -- the request ----------------------------------------------------------------------------

    async def _conversation(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the messages the model sees, the messages to keep for a next turn)."""
        kept: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise InvalidRequest("'previous_response_id' must be a string", param="previous_response_id")
            # Its session first: that is where the caller's right to it is checked.
            found = await _find(self.runtime, previous)
            record = await self._record(previous)
            if record is None:
                raise InvalidRequest(
                    f"Previous response '{previous}' was not stored (\"store\": false), or was deleted: it cannot be continued.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            kept = list(record["messages"])
            deltas, _ = await self._snapshot(found, wait=True)
            kept += wire.messages_of(_output_of(deltas, previous, record.get("model", "")))
        kept += _input_messages(body.get("input"))
        messages = list(kept)
        instructions = body.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise InvalidRequest("'instructions' must be a string", param="instructions")
            # Instructions are this response's own: not carried to the next turn.
            messages.insert(0, {"role": "system", "content": instructions})
        if not messages:
            raise InvalidRequest("'input' must hold at least one message", param="input")
        return messages, kept

    def _meta(self, body: dict[str, Any], response_id: str, created_at: float, chat: ChatRequest) -> wire.ResponseMeta:
        metadata = body.get("metadata") or {}
        return wire.ResponseMeta(
            id=response_id,
            created_at=int(created_at),
            model=chat.model,
            instructions=body.get("instructions"),
            max_output_tokens=chat.max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            metadata=metadata,
            previous_response_id=body.get("previous_response_id"),
            store=body.get("store", True) is not False,
            background=chat.background,
            tools=tuple(body.get("tools") or ()),
            tool_choice=body.get("tool_choice", "auto"),
            user=chat.user,
        )

    async def create_view(self) -> Response:
        body = await read_json()
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        unknown = sorted(set(body) - _KNOWN)
        if unknown:
            raise InvalidRequest(f"'{unknown[0]}' is not supported by this server's Responses API (docs/api.md, \"Responses\")", param=unknown[0])
        _check_request(body)
        messages, kept = await self._conversation(body)
        chat_body: dict[str, Any] = {"model": body.get("model"), "messages": messages}
        for name, target in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("user", "user")):
            if body.get(name) is not None:
                chat_body[target] = body[name]
        stream = body.get("stream") is True
        background = body.get("background") is True
        chat_body["stream"] = stream
        if stream:
            chat_body["stream_options"] = {"include_usage": True}
        chat_body["background"] = background
        if body.get("tools"):
            chat_body["tools"] = _chat_tools(body["tools"])
            if body.get("tool_choice") is not None:
                chat_body["tool_choice"] = _chat_tool_choice(body["tool_choice"])
            self._check_tools(body.get("model"))
        chat = ChatRequest.from_openai(chat_body)
        principal = current_principal()
        chat = attrs.evolve(chat, request_id=g.request_id, identity=principal.identity, team=principal.team, key_id=principal.key_id)
        session, headers = await self.runtime.start_chat(chat, principal)
        response_id = response_id_of(session.id)
        meta = self._meta(body, response_id, session.created_at, chat)
        handed_off = False
        try:
            if meta.store:
                self._keep(
                    response_id, {"messages": kept, "model": chat.model, "identity": principal.identity, "created_at": session.created_at}
                )
            headers = {**headers, "X-Session-ID": session.id}
            if background and not stream:
                output = _built(meta, [])
                return json_response(output.response("queued" if session.state == "pending" else "in_progress"), headers=headers)
            await session.wait_first()
            headers.update(session.headers)
            if session.error is not None and not session.chunks:
                # Nothing reached the client: a plain error status (a copy, so the
                # session keeps its error without this handler's traceback).
                error = copy.copy(session.error)
                error.headers = {**error.headers, **headers}
                raise error
            if not stream:
                await session.wait_done()
                output = _built(meta, session.chunks)
                status, error, reason = _status(session.state, session.finish_reason, session.error.summary() if session.error else None, background)
                return json_response(_final(output, status, session.usage, error, reason), headers=headers)
            response = Response(
                self._stream(session, meta),
                content_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            response.timeout = None
            handed_off = True
            return response
        finally:
            if not handed_off and not background:
                session.cancel("disconnected")
                session.release()

    def _check_tools(self, model: Any) -> None:
        """Function tools need a provider that passes them on."""
        try:
            route = self.runtime.providers.resolve(model)
        except APIError:
            return  # the chat request's own check says the model is unknown
        if not getattr(route.provider, "supports_tools", False):
            raise InvalidRequest(
                f"Model '{model}' is served by provider '{route.provider.name}', which does not take function tools; "
                "use a model of a provider that does (an OpenAI-compatible upstream).",
                param="tools",
                code="tools_not_supported",
            )

    async def _stream(self, session: Session, meta: wire.ResponseMeta) -> AsyncIterator[bytes]:
        output = wire.Output(meta)
        try:
            yield b"".join(wire.encode(e) for e in output.start("queued" if meta.background and session.state == "pending" else "in_progress"))
            async for batch in session.follow(0):
                data = output.feed_bytes(batch)
                if data:
                    yield data
            status, error, reason = _status(session.state, session.finish_reason, session.error.summary() if session.error else None, meta.background)
            yield b"".join(wire.encode(e) for e in output.finish(status, session.usage, error, reason))
        finally:
            # The client is gone or served. A background response goes on without it.
            if not session.background:
                if not session.finished:
                    session.cancel("disconnected")
                session.release()

    # -- reading, resuming, cancelling, deleting ------------------------------------------------

    async def _snapshot(self, found: Any, wait: bool = False) -> tuple[list[Delta], StoredSession | None]:
        """A session's deltas now (all of them, once it finished, with `wait`),
        and its end when it has one."""
        if isinstance(found, Session) and not wait:
            if not found.dropped_chunks:
                return list(found.chunks), None
        if not isinstance(found, (Session, StoredSession)) and not wait:
            # On another instance: its output so far, as a chat completion.
            completion = await found.completion()
            return _deltas_of_completion(completion), None
        if isinstance(found, StoredSession) and not found.finished and not wait:
            store = self.runtime.store
            deltas: list[Delta] = []
            while store is not None:
                batch = await store.chunks(found.id, len(deltas), 500)
                deltas += batch
                if len(batch) < 500:
                    break
            return deltas, None
        deltas = []
        end = None
        source = await self.runtime.follow_session(found, 0)
        async for item in source:
            if item is None:
                continue
            if isinstance(item, StoredSession):
                end = item
            elif isinstance(item, APIError):
                raise item
            else:
                deltas += item[1]
        return deltas, end

    async def _describe(self, response_id: str, found: Any) -> dict[str, Any]:
        record = await self._record(response_id) or {}
        deltas, end = await self._snapshot(found, wait=isinstance(found, StoredSession) and found.finished)
        info = found if isinstance(found, (Session, StoredSession)) else None
        if isinstance(found, Session):
            state, reason, usage, error, background = found.state, found.finish_reason, found.usage, found.error.summary() if found.error else None, found.background
        elif isinstance(found, StoredSession):
            state, reason, usage, error, background = found.state, found.finish_reason, found.usage, found.error, found.background
        else:
            data = found.to_json()
            state, reason, usage, error, background = data.get("state", "running"), data.get("finish_reason"), None, data.get("error"), bool(data.get("background"))
            usage = _usage_of(data.get("usage"))
        if end is not None:
            state, reason, usage, error = end.state, end.finish_reason, end.usage, end.error
        status, error, incomplete = _status(state, reason, error, background)
        meta = wire.ResponseMeta(
            id=response_id,
            created_at=int(info.created_at if info is not None else found.created_at),
            model=found.model if not isinstance(found, Session) else found.request.model,
            store=bool(record),
            background=background,
            max_output_tokens=found.request.max_tokens if isinstance(found, Session) else None,
            temperature=found.request.temperature if isinstance(found, Session) else None,
            top_p=found.request.top_p if isinstance(found, Session) else None,
        )
        output = _built(meta, deltas)
        if status in ("queued", "in_progress"):
            return output.response(status)
        return _final(output, status, usage, error, incomplete)

    async def retrieve_view(self, response_id: str) -> Response:
        found = await _find(self.runtime, response_id)
        if request.args.get("stream") in ("true", "1"):
            return await self._resume(response_id, found)
        return json_response(await self._describe(response_id, found))

    async def _resume(self, response_id: str, found: Any) -> Response:
        raw = request.args.get("starting_after")
        after = -1
        if raw is not None:
            if not raw.isdigit() or len(raw) > 12:
                raise InvalidRequest(f"'starting_after' must be a sequence number (an integer of 0 or more), got '{raw[:40]}'", param="starting_after")
            after = int(raw)
        source = await self.runtime.follow_session(found, 0)
        if isinstance(found, Session):
            model, background, created = found.request.model, found.background, found.created_at
        else:
            model, background, created = found.model, bool(found.to_json().get("background")), found.created_at
        meta = wire.ResponseMeta(id=response_id, created_at=int(created), model=model, background=background, store=True)

        async def events() -> AsyncIterator[bytes]:
            output = wire.Output(meta)

            def tail(batch: list[dict[str, Any]]) -> bytes:
                return b"".join(wire.encode(e) for e in batch if e["sequence_number"] > after)

            out = tail(output.start("in_progress"))
            if out:
                yield out
            async for item in source:
                if item is None:
                    yield b": keep-alive\n\n"
                elif isinstance(item, StoredSession):
                    status, error, reason = _status(item.state, item.finish_reason, item.error, background)
                    out = tail(output.finish(status, item.usage, error, reason))
                    if out:
                        yield out
                    return
                elif isinstance(item, APIError):
                    yield b"".join(wire.encode(e) for e in output.error(item.message, item.code))
                    return
                elif output.sequence > after:
                    out = output.feed_bytes(item[1])
                    if out:
                        yield out
                else:
                    out = tail(output.feed(item[1]))
                    if out:
                        yield out

        response = Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.timeout = None
        return response

    async def cancel_view(self, response_id: str) -> Response:
        found = await _find(self.runtime, response_id)
        if isinstance(found, Session):
            if found.cancel("stopped"):
                with trio.move_on_after(5):
                    await found.wait_done()
        elif not isinstance(found, StoredSession):
            await found.stop()
            found = await _find(self.runtime, response_id)
        # Idempotent: a finished response is answered as it is.
        return json_response(await self._describe(response_id, found))

    async def delete_view(self, response_id: str) -> Response:
        session_id = session_id_of(response_id)
        found = await _find(self.runtime, response_id)
        deleted = False
        if isinstance(found, Session):
            if found.cancel("stopped"):
                with trio.move_on_after(5):
                    await found.wait_done()
            deleted = self.runtime.sessions.remove(session_id)
        elif not isinstance(found, StoredSession):
            deleted = await found.delete()
        if self.runtime.store is not None:
            deleted = await self.runtime.store.delete(session_id) or deleted
        if await self._record(response_id) is not None:
            self._keep(response_id, {"deleted": True, "at": time.time()})
            deleted = True
        if not deleted:
            raise NotFound(f"No response with id '{response_id}'.")
        return json_response({"id": response_id, "object": "response", "deleted": True})


# -- request checks and conversions ------------------------------------------------------------


def _check_request(body: dict[str, Any]) -> None:
    if body.get("model") is None:
        raise InvalidRequest("'model' is required", param="model")
    for name in ("stream", "background", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise InvalidRequest(f"'{name}' must be a boolean", param=name)
    if body.get("background") is True and body.get("store") is False:
        raise InvalidRequest("a background response must be stored (\"store\": true)", param="store")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise InvalidRequest("'metadata' must be an object of at most 16 string values", param="metadata")
        for key, value in metadata.items():
            if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
                raise InvalidRequest("'metadata' keys are at most 64 characters and its values strings of at most 512", param="metadata")
    text = body.get("text")
    if text is not None:
        fmt = (text or {}).get("format", {}) if isinstance(text, dict) else None
        if not isinstance(fmt, dict) or fmt.get("type", "text") != "text":
            raise InvalidRequest("only text output is supported ('text.format.type' = \"text\")", param="text.format")
    if body.get("truncation") not in (None, "disabled"):
        raise InvalidRequest("only 'truncation' = \"disabled\" is supported", param="truncation")


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"{param}[{i}]: only text parts are supported, got '{kind}'", param=f"{param}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"{param} must be a string or an array of text parts", param=param)


def _input_messages(value: Any) -> list[dict[str, Any]]:
    """The `input` of a request as chat messages."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise InvalidRequest("'input' must be a string or an array of input items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{param} must be an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise InvalidRequest(f"{param}.role must be one of user, assistant, system, developer", param=f"{param}.role")
            out.append({"role": "system" if role == "developer" else role, "content": _text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1].get("content"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output if isinstance(output, str) else orjson.dumps(output).decode()})
        elif kind == "reasoning":
            continue  # the model's own past reasoning: not sent back to a chat model
        else:
            raise InvalidRequest(f"{param}: input items of type '{kind}' are not supported", param=f"{param}.type")
    return out


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise InvalidRequest(f"tools[{i}]: only function tools are supported, got '{kind}'", param=f"tools[{i}]")
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise InvalidRequest("'tool_choice' must be \"auto\", \"none\", \"required\" or a function", param="tool_choice")


def _status(state: str, finish_reason: str | None, error: dict[str, Any] | None, background: bool) -> tuple[str, dict[str, Any] | None, str | None]:
    """A session's state as a response's (status, error, incomplete reason)."""
    if state == "pending":
        return ("queued" if background else "in_progress"), None, None
    if state == "running":
        return "in_progress", None, None
    if state == "completed":
        if finish_reason == "length":
            return "incomplete", None, "max_output_tokens"
        return "completed", None, None
    if state in _CANCELLED:
        return "cancelled", None, None
    if state == "interrupted":
        return "failed", {"code": "server_error", "message": "The response was interrupted: the server running it stopped before it finished."}, None
    error = error or {}
    return "failed", {"code": error.get("code") or "server_error", "message": error.get("message") or "The response failed."}, None


def _built(meta: wire.ResponseMeta, deltas: Any) -> wire.Output:
    """An `Output` with these deltas in it (its events are not wanted)."""
    output = wire.Output(meta)
    output.start()
    output.feed(deltas)
    return output


def _final(output: wire.Output, status: str, usage: Any, error: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """A finished response: its items closed (completed, or incomplete when it
    did not complete), as its terminal event has it."""
    return output.finish(status, usage, error, reason)[-1]["response"]


def _output_of(deltas: list[Delta], response_id: str, model: str) -> list[dict[str, Any]]:
    return _built(wire.ResponseMeta(id=response_id, created_at=0, model=model), deltas).items


def _deltas_of_completion(completion: dict[str, Any]) -> list[Delta]:
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    out = []
    if message.get("reasoning_content"):
        out.append(Delta(reasoning=message["reasoning_content"]))
    if message.get("content"):
        out.append(Delta(content=message["content"]))
    calls = message.get("tool_calls")
    if calls:
        out.append(Delta(tool_calls=[{**call, "index": i} for i, call in enumerate(calls)]))
    return out


def _usage_of(data: dict[str, Any] | None) -> Any:
    from streamvisor.hooks import Usage

    if not data:
        return None
    details = data.get("completion_tokens_details") or {}
    return Usage(data.get("prompt_tokens", 0), data.get("completion_tokens", 0), details.get("reasoning_tokens", 0), exact=bool(data.get("exact", True)))


def _op(summary: str) -> dict[str, Any]:
    return {"summary": summary, "tags": ["responses"], "description": summary + " (docs/api.md, \"Responses\")."}
