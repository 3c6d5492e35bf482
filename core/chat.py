"""The chat data that flows from a client through providers back to a client:
the validated request, the deltas a provider yields, and token usage.

`ChatRequest.from_openai` is the single place where an OpenAI request body is
checked; every rule it enforces answers with a 400 naming the offending `param`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import attrs
import orjson

from .errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

#: Parameters streamvisor reads itself; everything else in the body is passed to
#: providers untouched in `ChatRequest.extra` (tools, response_format, ...).
_KNOWN = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "n",
        "user",
        "background",
    }
)


@attrs.frozen(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    #: True when the counts come from the provider's tokenizer, False when estimated.
    exact: bool = True
    #: Prompt tokens the provider served from its prompt cache (part of
    #: `prompt_tokens`, priced apart; contract 1.2).
    cached_tokens: int = 0
    #: What the session cost in US dollars, from the pricing plugin's table; None
    #: when no plugin prices sessions (contract 1.2).
    cost_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.reasoning_tokens:
            body["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        if self.cached_tokens:
            body["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.cost_usd is not None:
            body["cost_usd"] = self.cost_usd
        return body

    def to_json(self) -> dict[str, Any]:
        return {**self.to_openai(), "cost_usd": self.cost_usd, "exact": self.exact}


@attrs.frozen(slots=True)
class Delta:
    """One step of a completion as a provider yields it.

    Only the fields a client sees are encoded into a chunk; `usage` is metadata:
    a provider may attach its cumulative usage to any delta, and the last one seen
    is what the session records (so a stopped stream keeps exact partial counts).
    """

    content: str | None = None
    reasoning: str | None = None
    role: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None

    @property
    def visible(self) -> bool:
        return bool(self.content or self.reasoning or self.role or self.tool_calls or self.finish_reason)


def deltas_to_json(deltas: Sequence[Delta]) -> bytes:
    """Deltas as compact JSON, to keep them outside the process (contract 1.4;
    the store's transcripts and the cluster's published chunks use it): a
    delta of content only is its string, any other an object of the fields it
    has (`c` content, `r` reasoning, `o` role, `t` tool calls, `f` finish
    reason). Usage is not kept. `delta_from_json` reads one item back."""
    items: list[Any] = []
    append = items.append
    for d in deltas:
        if d.reasoning is None and d.role is None and d.tool_calls is None and d.finish_reason is None and d.content is not None:
            append(d.content)
            continue
        out: dict[str, Any] = {}
        if d.content is not None:
            out["c"] = d.content
        if d.reasoning is not None:
            out["r"] = d.reasoning
        if d.role is not None:
            out["o"] = d.role
        if d.tool_calls is not None:
            out["t"] = d.tool_calls
        if d.finish_reason is not None:
            out["f"] = d.finish_reason
        append(out)
    return orjson.dumps(items)


def delta_from_json(item: Any) -> Delta:
    """One item of `deltas_to_json`'s list as a `Delta` again."""
    if isinstance(item, str):
        return Delta(content=item)
    return Delta(content=item.get("c"), reasoning=item.get("r"), role=item.get("o"), tool_calls=item.get("t"), finish_reason=item.get("f"))


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{name}' must be a number, got {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {type(value).__name__}", param=name)
    if value < lo:
        raise InvalidRequest(f"'{name}' must be at least {lo}, got {value}", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean, got {type(value).__name__}", param=name)
    return value


def _check_message(i: int, message: Any) -> dict[str, Any]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{param}' must be an object, got {type(message).__name__}", param=param)
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidRequest(f"'{param}.role' is required and must be a string", param=f"{param}.role")
    if role not in ROLES:
        raise InvalidRequest(
            f"'{param}.role' must be one of {', '.join(sorted(ROLES))}, got '{role}'", param=f"{param}.role"
        )
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise InvalidRequest(
            f"'{param}.content' must be a string or an array of content parts, got {type(content).__name__}",
            param=f"{param}.content",
        )
    if content is None and role != "assistant":
        raise InvalidRequest(f"'{param}.content' is required for role '{role}'", param=f"{param}.content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(f"{param}.content[{j}]", part)
    return message


def _check_part(param: str, part: Any) -> None:
    """A content part: an object with a string `type`; a text part's `text` is a
    string (every provider and the usage estimate join them)."""
    if not isinstance(part, dict):
        raise InvalidRequest(f"'{param}' must be an object, got {type(part).__name__}", param=param)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise InvalidRequest(f"'{param}.type' is required and must be a string", param=f"{param}.type")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise InvalidRequest(f"'{param}.text' is required and must be a string", param=f"{param}.text")


def message_text(message: dict[str, Any]) -> str:
    """The text of a message, joining the text parts of a multi-part content."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


@attrs.frozen
class ChatRequest:
    model: str
    messages: tuple[dict[str, Any], ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    #: streamvisor's extension (named as in OpenAI's Responses API): the session
    #: outlives the HTTP request; without `stream` the answer is 202 at once.
    background: bool = False
    #: Every other body parameter, passed through to providers unchanged.
    extra: dict[str, Any] = attrs.field(factory=dict)
    #: Set by the runtime: who is asking, and for which request and session.
    request_id: str = ""
    session_id: str = ""
    #: The caller's identity: the owner of the API key it came with, or
    #: "anonymous" when no plugin authenticates requests.
    identity: str = "anonymous"
    #: The caller's team, when its key belongs to one (contract 1.2).
    team: str | None = None
    #: The id of the credential the request came with (an API key's id), or
    #: None (contract 1.2).
    key_id: str | None = None
    #: The W3C trace context the client sent (`traceparent`, `tracestate`),
    #: set by the runtime (contract 1.5): what a tracing plugin continues.
    trace_headers: Mapping[str, str] = attrs.field(factory=dict)
    #: Headers a provider adds to its upstream request (contract 1.5): set by a
    #: middleware for the call it makes (a tracing plugin's `traceparent`), sent
    #: by providers that talk HTTP. Never part of the cache key.
    upstream_headers: Mapping[str, str] = attrs.field(factory=dict)
    #: The provider this call must go to (contract 1.6): set by a middleware (a
    #: router choosing among deployments of one model) with `attrs.evolve`;
    #: `model` is then one of that provider's models. None: whichever provider
    #: serves `model`. Never set from the client's body.
    provider: str | None = None

    @classmethod
    def from_openai(cls, body: Any) -> "ChatRequest":
        if not isinstance(body, dict):
            raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is None:
            raise InvalidRequest("'model' is required", param="model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' must be a non-empty string", param="model")
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequest("'messages' is required", param="messages")
        if not isinstance(messages, list):
            raise InvalidRequest(f"'messages' must be an array, got {type(messages).__name__}", param="messages")
        if not messages:
            raise InvalidRequest("'messages' must contain at least one message", param="messages")
        checked = tuple(_check_message(i, m) for i, m in enumerate(messages))

        stream = _flag(body, "stream")
        background = _flag(body, "background")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not isinstance(options, dict):
                raise InvalidRequest("'stream_options' must be an object", param="stream_options")
            if not stream:
                raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
            value = options.get("include_usage", False)
            if not isinstance(value, bool):
                raise InvalidRequest(
                    "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage"
                )
            include_usage = value

        n = _integer(body, "n", 1)
        if n is not None and n != 1:
            raise InvalidRequest("only 'n' = 1 is supported", param="n")
        max_tokens = _integer(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1)
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            if len(stop) > 4:
                raise InvalidRequest("'stop' may hold at most 4 sequences", param="stop")
            stops = tuple(stop)
        else:
            raise InvalidRequest("'stop' must be a string or an array of strings", param="stop")
        seed = _integer(body, "seed", -(1 << 63))
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise InvalidRequest("'user' must be a string", param="user")
        return cls(
            model=model,
            messages=checked,
            stream=stream,
            include_usage=include_usage,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_p=_number(body, "top_p", 0.0, 1.0),
            stop=stops,
            seed=seed,
            user=user,
            background=background,
            extra={k: v for k, v in body.items() if k not in _KNOWN},
        )

    def to_openai(self, model: str | None = None) -> dict[str, Any]:
        """The request as an OpenAI body again (for an OpenAI-compatible upstream)."""
        body: dict[str, Any] = dict(self.extra)
        body["model"] = model or self.model
        body["messages"] = list(self.messages)
        for name in ("max_tokens", "temperature", "top_p", "seed", "user"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.stop:
            body["stop"] = list(self.stop)
        return body

    def estimate_prompt_tokens(self) -> int:
        """A rough count (about four characters a token) for providers that give none."""
        chars = sum(len(message_text(m)) for m in self.messages)
        return max(1, chars // 4) if chars else 0
