"""The wire format of OpenAI's Responses API, built from chat-completion deltas.

Pure and synchronous: no I/O, no clock, no randomness. An `Output` turns a
session's deltas, in order, into the Responses stream events and the response
object; the same deltas give the same events with the same `sequence_number`s
however they are split into batches, because every delta is handled on its own
and every id is derived from the response's id and the item's output index. A
client that resumes with `starting_after=N` is served by regenerating the events
from the session's first delta and skipping those numbered N or less.

What a stream looks like::

    response.created (0), response.in_progress (1)
    per item, in output order:
      message         output_item.added, content_part.added,
                      output_text.delta..., output_text.done, content_part.done,
                      output_item.done
      reasoning       output_item.added, reasoning_summary_part.added,
                      reasoning_summary_text.delta..., reasoning_summary_text.done,
                      reasoning_summary_part.done, output_item.done
      function_call   output_item.added, function_call_arguments.delta...,
                      function_call_arguments.done, output_item.done
    response.completed | response.incomplete | response.failed

Choices where OpenAI's types leave room:

- **Cancelled.** `ResponseStatus` has `cancelled`, but no stream event is named
  for it (the `response.cancelled` of the openai package is a webhook event, not
  a stream event). A cancelled response ends its stream with `response.failed`
  whose response has status `cancelled` and `error` None (unless the caller
  passes one): no `IncompleteDetails.reason` describes a cancellation, so
  `response.incomplete` would misstate it, and `response.failed` is the terminal
  event a client takes for "ended without completing".
- **Items cut short.** The item that is still open when a response ends other
  than `completed` is closed with its `*.done` events and status `incomplete`
  (its reasoning summary part with `status: "incomplete"`), as the types
  describe for interrupted generation; items closed because another one
  followed are `completed`.
- **Errors.** `ResponseError.code` is a closed list. A failed response's error
  keeps the caller's code when the list has it; `rate_limited` becomes
  `rate_limit_exceeded` and any other code `server_error`, the original code then
  kept in the error's `type` (the types' "original error type"). A failed
  response without an error gets `server_error`.
- **logprobs.** `output_text.delta` and `.done` carry `logprobs: []` (required
  by the types), and the `output_text` part does too: chat deltas carry none.
- **Reasoning** (`reasoning_content` of the chat deltas) is streamed as one
  reasoning summary part per reasoning item, as the issue asks, not as
  `reasoning_text` content.
- **Ids.** `msg_`, `rs_` and `fc_` followed by the response id's suffix (after
  `resp_`) and the output index; a tool call whose chat deltas carry no `id` gets
  the `call_id` `call_<suffix>_<output index>` (kept if an id comes in a later
  piece: clients match an item's events by its `call_id`).
- **Tool call pieces.** A piece belongs to the open call with its `index`; a
  piece with another `index`, or with an `id` other than the open call's, starts
  a new call (some servers repeat index 0 or leave it out). The first name seen
  is the call's name. Chat providers stream calls one after another; a piece for
  a call already closed is ignored.
- **The response object** has no `output_text` (the client computes it) and no
  `completed_at` (that needs a clock). It says `parallel_tool_calls: true`,
  `truncation: "disabled"`, `text: {"format": {"type": "text"}}` and `store`.
- **usage** has `input_tokens_details.cache_write_tokens` (0): the types require
  it.
- **A queued start** is `response.created` with status `queued`, then
  `response.in_progress`; no `response.queued` between them.
- **messages_of** joins function calls to the assistant message just before
  them, as the one chat message the model produced.

Besides the stream, `Output.error()` makes OpenAI's `error` event (numbered in
the same sequence) and `Output.items` is the output so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from streamvisor.hooks import Delta, Usage

__all__ = ["ResponseMeta", "Output", "usage_json", "encode", "messages_of", "error_json"]

#: The codes `ResponseError.code` allows.
_ERROR_CODES = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "data_residency_mismatch",
        "bio_policy",
        "misalignment_policy_violation",
        "vector_store_timeout",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)
_ERROR_ALIASES = {"rate_limited": "rate_limit_exceeded"}

_TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.failed",
}

_MESSAGE = "message"
_REASONING = "reasoning"
_CALL = "function_call"
_PREFIX = {_MESSAGE: "msg", _REASONING: "rs", _CALL: "fc"}


@attrs.frozen
class ResponseMeta:
    """What a response object says besides its output and status."""

    id: str  # "resp_<hex>"
    created_at: int
    model: str
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict = attrs.field(factory=dict)
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    tools: tuple = ()  # Responses-format tools, as the client sent them
    tool_choice: Any = "auto"
    user: str | None = None


@attrs.define(slots=True, eq=False)
class _Item:
    kind: str
    index: int
    id: str
    pieces: list[str] = attrs.field(factory=list)  # text, summary text or arguments
    status: str = "in_progress"
    call_id: str = ""  # as announced: the chat delta's id, else one made up
    given_id: str = ""  # the chat delta's id, or ""
    name: str = ""
    chat_index: Any = None
    #: `Output.feed_bytes`'s encoded event, before and after the sequence number.
    template: tuple[bytes, bytes] | None = None

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def json(self) -> dict[str, Any]:
        if self.kind == _MESSAGE:
            return {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "status": self.status,
                "content": [_text_part(self.text)],
            }
        if self.kind == _REASONING:
            return {
                "id": self.id,
                "type": "reasoning",
                "status": self.status,
                "summary": [{"type": "summary_text", "text": self.text}],
            }
        return {
            "id": self.id,
            "type": "function_call",
            "status": self.status,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.text,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Output:
    """A response's output, built from deltas in order, and the stream events that say so."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self._suffix = meta.id[len("resp_") :] if meta.id.startswith("resp_") else meta.id
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._seq = 0
        self._started = False
        self._finished = False

    # -- the public interface ------------------------------------------------------

    @property
    def sequence(self) -> int:
        """The next sequence number."""
        return self._seq

    @property
    def text(self) -> str:
        """The output text so far (all message text)."""
        return "".join(item.text for item in self._items if item.kind == _MESSAGE)

    @property
    def items(self) -> list[dict[str, Any]]:
        """The output items so far, as in `response()`."""
        return [item.json() for item in self._items]

    def start(self, status: str = "in_progress") -> list[dict[str, Any]]:
        """`response.created` (its response with status `status`: `queued` for a
        background response) then `response.in_progress`."""
        if self._started:
            raise RuntimeError("the response was started already")
        self._started = True
        return [
            self._event("response.created", response=self.response(status)),
            self._event("response.in_progress", response=self.response("in_progress")),
        ]

    def feed(self, deltas: Sequence[Delta]) -> list[dict[str, Any]]:
        """The events for these deltas."""
        if not self._started or self._finished:
            raise RuntimeError("feed() comes after start() and before finish()")
        events: list[dict[str, Any]] = []
        for delta in deltas:
            if delta.reasoning:
                self._append(events, _REASONING, delta.reasoning)
            if delta.content:
                self._append(events, _MESSAGE, delta.content)
            if delta.tool_calls:
                for piece in delta.tool_calls:
                    self._tool_call(events, piece)
        return events

    def feed_bytes(self, deltas: Sequence[Delta]) -> bytes:
        """The events for these deltas, encoded: the same bytes as
        `b"".join(encode(e) for e in feed(deltas))`, with the common case (text
        for the message being written) encoded from a template instead of a
        dict per delta (measured: a third of this module's time per stream)."""
        out: list[bytes] = []
        for delta in deltas:
            item = self._open
            if (
                delta.content
                and item is not None
                and item.kind == _MESSAGE
                and delta.reasoning is None
                and not delta.tool_calls
                and self._started
                and not self._finished
            ):
                template = item.template
                if template is None:
                    template = item.template = (
                        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":',
                        b',"item_id":' + orjson.dumps(item.id) + b',"output_index":%d,"content_index":0,"delta":' % item.index,
                    )
                item.pieces.append(delta.content)
                out.append(b"%s%d%s%s,\"logprobs\":[]}\n\n" % (template[0], self._seq, template[1], orjson.dumps(delta.content)))
                self._seq += 1
            else:
                for event in self.feed((delta,)):
                    out.append(encode(event))
        return b"".join(out)

    def finish(
        self,
        status: str,
        usage: Usage | None,
        error: dict | None = None,
        incomplete_reason: str | None = None,
    ) -> list[dict[str, Any]]:
        """Close what is open, then the terminal event for `status`: `completed`,
        `incomplete`, `failed` or `cancelled` (the module's docstring says which
        event each gets)."""
        if status not in _TERMINAL_EVENTS:
            raise ValueError(f"a response finishes completed, incomplete, failed or cancelled, not {status!r}")
        if not self._started or self._finished:
            raise RuntimeError("finish() comes after start(), once")
        events: list[dict[str, Any]] = []
        self._close(events, "completed" if status == "completed" else "incomplete")
        self._finished = True
        response = self.response(status, usage, error, incomplete_reason)
        events.append(self._event(_TERMINAL_EVENTS[status], response=response))
        return events

    def error(self, message: str, code: str | None = None, param: str | None = None) -> list[dict[str, Any]]:
        """An `error` event (OpenAI's stream error, not tied to an item), with the next sequence number."""
        return [self._event("error", code=code, message=message, param=param)]

    def response(
        self,
        status: str,
        usage: Usage | None = None,
        error: dict | None = None,
        incomplete_reason: str | None = None,
    ) -> dict[str, Any]:
        """The whole response object now."""
        meta = self.meta
        if status == "failed" and error is None:
            error = {"code": "server_error", "message": "The response failed."}
        return {
            "id": meta.id,
            "object": "response",
            "created_at": meta.created_at,
            "status": status,
            "background": meta.background,
            "error": error_json(error) if error is not None else None,
            "incomplete_details": {"reason": incomplete_reason} if status == "incomplete" else None,
            "instructions": meta.instructions,
            "max_output_tokens": meta.max_output_tokens,
            "model": meta.model,
            "output": [item.json() for item in self._items],
            "parallel_tool_calls": True,
            "previous_response_id": meta.previous_response_id,
            "store": meta.store,
            "temperature": meta.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": meta.tool_choice,
            "tools": list(meta.tools),
            "top_p": meta.top_p,
            "truncation": "disabled",
            "usage": usage_json(usage),
            "user": meta.user,
            "metadata": dict(meta.metadata),
        }

    # -- building ------------------------------------------------------------------

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _append(self, events: list[dict[str, Any]], kind: str, text: str) -> None:
        item = self._open
        if item is None or item.kind != kind:
            item = self._open_item(events, kind)
        item.pieces.append(text)
        if kind == _MESSAGE:
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item.id,
                    output_index=item.index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        else:
            events.append(
                self._event(
                    "response.reasoning_summary_text.delta",
                    item_id=item.id,
                    output_index=item.index,
                    summary_index=0,
                    delta=text,
                )
            )

    def _tool_call(self, events: list[dict[str, Any]], piece: dict[str, Any]) -> None:
        function = piece.get("function") or {}
        chat_index = piece.get("index")
        call_id = piece.get("id") or ""
        name = function.get("name") or ""
        arguments = function.get("arguments") or ""
        item = self._open
        continues = (
            item is not None
            and item.kind == _CALL
            and (chat_index is None or item.chat_index is None or chat_index == item.chat_index)
            and (not call_id or not item.given_id or call_id == item.given_id)
        )
        if not continues:
            if chat_index is not None and not call_id and not name and self._closed_call(chat_index):
                return  # a late piece of a call already closed
            item = self._open_item(events, _CALL, call_id=call_id, given_id=call_id, name=name, chat_index=chat_index)
        else:
            assert item is not None
            if not item.name and name:
                item.name = name
            if item.chat_index is None:
                item.chat_index = chat_index
            if not item.given_id and call_id:
                item.given_id = call_id  # the call_id announced stays: clients match items by it
        if arguments:
            item.pieces.append(arguments)
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=item.index,
                    delta=arguments,
                )
            )

    def _closed_call(self, chat_index: Any) -> bool:
        return any(item.kind == _CALL and item.chat_index == chat_index for item in self._items)

    def _open_item(self, events: list[dict[str, Any]], kind: str, **fields: Any) -> _Item:
        self._close(events, "completed")
        index = len(self._items)
        item = _Item(kind=kind, index=index, id=f"{_PREFIX[kind]}_{self._suffix}_{index}", **fields)
        if kind == _CALL and not item.call_id:
            item.call_id = f"call_{self._suffix}_{index}"
        self._items.append(item)
        self._open = item
        if kind == _MESSAGE:
            added = {"id": item.id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        elif kind == _REASONING:
            added = {"id": item.id, "type": "reasoning", "status": "in_progress", "summary": []}
        else:
            added = item.json()
        events.append(self._event("response.output_item.added", output_index=index, item=added))
        if kind == _MESSAGE:
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        elif kind == _REASONING:
            events.append(
                self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item.id,
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            )
        return item

    def _close(self, events: list[dict[str, Any]], status: str) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = item.text
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == _MESSAGE:
            events.append(self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            events.append(self._event("response.content_part.done", **where, content_index=0, part=_text_part(text)))
        elif item.kind == _REASONING:
            events.append(self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text))
            part_done = self._event(
                "response.reasoning_summary_part.done",
                **where,
                summary_index=0,
                part={"type": "summary_text", "text": text},
            )
            if status != "completed":
                part_done["status"] = "incomplete"
            events.append(part_done)
        else:
            events.append(self._event("response.function_call_arguments.done", **where, arguments=text))
        item.status = status
        events.append(self._event("response.output_item.done", output_index=item.index, item=item.json()))


# -- the other pieces ---------------------------------------------------------------


def usage_json(usage: Usage | None) -> dict[str, Any] | None:
    """A `Usage` in the Responses API's names, or None."""
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def error_json(error: dict[str, Any]) -> dict[str, Any]:
    """A failed response's `error`: `{"code", "message"}` with a code the
    Responses API knows (the module's docstring says how others are mapped)."""
    original = error.get("code")
    code = _ERROR_ALIASES.get(original, original) if isinstance(original, str) else None
    body: dict[str, Any] = {
        "code": code if code in _ERROR_CODES else "server_error",
        "message": str(error.get("message") or "The response failed."),
    }
    if error.get("param") is not None:
        body["param"] = error["param"]
    if error.get("type") is not None:
        body["type"] = error["type"]
    elif original is not None and original != body["code"]:
        body["type"] = original
    return body


def encode(event: dict[str, Any]) -> bytes:
    """An event as a Server-Sent Event: `event: <type>` and its compact JSON."""
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def messages_of(output_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output as chat-completions assistant messages, to continue a
    conversation.

    A message item is `{"role": "assistant", "content": text}`; function calls
    become the `tool_calls` of an assistant message: of the message just before
    them when there is one (a chat model's turn with text and calls is one
    message), else of a message of their own with `content` None. Consecutive
    calls share one message. Reasoning items are left out.
    """
    messages: list[dict[str, Any]] = []
    last: dict[str, Any] | None = None  # the message function calls may join
    for item in output_items:
        kind = item.get("type")
        if kind == "message":
            parts = item.get("content") or []
            text = "".join(p.get("text") or "" for p in parts if p.get("type") == "output_text")
            message: dict[str, Any] = {"role": "assistant", "content": text}
            refusal = "".join(p.get("refusal") or "" for p in parts if p.get("type") == "refusal")
            if refusal:
                message["refusal"] = refusal
            messages.append(message)
            last = message
        elif kind == "function_call":
            if last is None:
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
                }
            )
        elif kind != "reasoning":
            last = None  # reasoning is left out and does not part a message from its calls
    return messages
