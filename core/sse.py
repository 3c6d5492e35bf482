"""The OpenAI wire format: chunk objects as Server-Sent Events, and the
non-streaming completion object.

Each session gets one `ChunkEncoder`; the parts of a chunk that never change
(id, created, model) are encoded once, so a chunk costs one small orjson call.
Every event carries an `id:` (the chunk's offset in the session buffer) so that a
client can resume from `Last-Event-ID`.
"""

from __future__ import annotations

from typing import Any, Iterable

import orjson

from .chat import Delta, Usage
from .errors import APIError

DONE = b"data: [DONE]\n\n"


def _delta_body(delta: Delta) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if delta.role is not None:
        body["role"] = delta.role
    if delta.content is not None:
        body["content"] = delta.content
    elif delta.role is not None:
        body["content"] = ""
    if delta.reasoning is not None:
        body["reasoning_content"] = delta.reasoning
    if delta.tool_calls is not None:
        body["tool_calls"] = delta.tool_calls
    return body


class ChunkEncoder:
    def __init__(self, completion_id: str, model: str, created: int) -> None:
        head = orjson.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model})
        self._head = head[:-1]  # without the closing brace
        self._choice = self._head + b',"choices":[{"index":0,"delta":'

    def chunk(self, offset: int, delta: Delta) -> bytes:
        finish = b"null" if delta.finish_reason is None else orjson.dumps(delta.finish_reason)
        return b"".join(
            (
                b"id: %d\ndata: " % offset,
                self._choice,
                orjson.dumps(_delta_body(delta)),
                b',"logprobs":null,"finish_reason":',
                finish,
                b"}]}\n\n",
            )
        )

    def chunks(self, offset: int, deltas: Iterable[Delta]) -> bytes:
        return b"".join(self.chunk(offset + i, delta) for i, delta in enumerate(deltas))

    def usage(self, offset: int, usage: Usage) -> bytes:
        return b"id: %d\ndata: %s,\"choices\":[],\"usage\":%s}\n\n" % (offset, self._head, orjson.dumps(usage.to_openai()))


class SSEBoundError(ValueError):
    """A stream exceeded one of the decoder's bounds."""


class SSEDecoder:
    """Splits a byte stream of Server-Sent Events into their `data` payloads.

    Fed raw bytes as they arrive (any split), it returns the data of every event
    completed so far (the `data:` lines of one event joined with newlines). Other
    fields (`id:`, `event:`, comments) are skipped. What it holds is bounded: the
    partial line by `max_line`, the data of the event being read by `max_event`
    (both 1 MiB by default); past either, `feed` raises `SSEBoundError` and lets
    go of all it held, and a stream that sends one line or one event without end
    cannot grow it.
    """

    def __init__(self, max_line: int = 1024 * 1024, max_event: int = 1024 * 1024) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event_bytes = 0
        self.max_line = max_line
        self.max_event = max_event

    @property
    def pending(self) -> bool:
        """Whether an event (or a line) has begun and not ended yet."""
        return bool(self._buffer or self._data)

    def feed(self, chunk: bytes) -> list[bytes]:
        events: list[bytes] = []
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(self._data[0] if len(self._data) == 1 else b"\n".join(self._data))
                    self._data = []
                    self._event_bytes = 0
            elif line.startswith(b"data:"):
                value = line[5:]
                value = value[1:] if value.startswith(b" ") else value
                self._event_bytes += len(value) + 1
                if self._event_bytes > self.max_event:
                    self._reset()
                    raise SSEBoundError(f"an event is larger than {self.max_event} bytes")
                self._data.append(value)
        self._buffer = buffer[start:]
        if len(self._buffer) > self.max_line:
            self._reset()
            raise SSEBoundError(f"a line is longer than {self.max_line} bytes")
        return events

    def _reset(self) -> None:
        # All of it: an event size left behind would refuse every later event.
        self._buffer = b""
        self._data = []
        self._event_bytes = 0

    def close(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events


def error_event(error: APIError, request_id: str | None) -> bytes:
    return b"data: " + orjson.dumps(error.body(request_id)) + b"\n\n"


def completion(completion_id: str, model: str, created: int, deltas: Iterable[Delta], finish_reason: str | None, usage: Usage) -> dict[str, Any]:
    """The non-streaming `chat.completion` object made from a session's buffer."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta.content:
            content.append(delta.content)
        if delta.reasoning:
            reasoning.append(delta.reasoning)
        for call in delta.tool_calls or ():
            _merge_tool_call(calls, call)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.to_openai(),
    }


def _merge_tool_call(calls: dict[int, dict[str, Any]], part: dict[str, Any]) -> None:
    """Fold one streamed tool-call fragment into the complete call at its index."""
    index = part.get("index", len(calls))
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if part.get("id"):
        call["id"] = part["id"]
    if part.get("type"):
        call["type"] = part["type"]
    function = part.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]
