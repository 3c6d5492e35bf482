"""The `scripted` provider: deterministic text, delays and injected failures.

For tests and demos: each configured model streams its text word by word, with an
optional delay between chunks, optional reasoning first, and failures injected
before the first chunk (the first N requests) or after a number of chunks. Token
counts are the words it sent, so they are exact by its own definition.
"""

from __future__ import annotations

import re
from typing import AsyncIterator

import attrs
import trio

from streamvisor.hooks import ChatRequest, Delta, ModelInfo, UpstreamError, Usage, hookimpl, message_text

_WORDS = re.compile(r"\s*\S+")


@attrs.frozen
class ScriptedModel:
    name: str
    text: str = "The quick brown fox jumps over the lazy dog."
    #: Reply with the last user message instead of `text`.
    echo: bool = False
    #: Send the text this many times (a long stream from a short script).
    repeat: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    #: Streamed as reasoning_content before the text.
    reasoning: str = ""
    #: Seconds before the first chunk, and between chunks.
    first_delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    #: The first N requests to this model fail before any chunk.
    fail_first: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: Fail every stream after this many chunks (-1: never).
    fail_after: int = -1
    error_status: int = 502
    finish_reason: str = "stop"
    #: With function tools in the request: call this one (its arguments
    #: streamed in pieces) instead of answering, unless the last message is a
    #: tool's result, which the answer then quotes ("The tool said: ...").
    tool_call: str = ""
    tool_arguments: str = "{}"
    #: What `list_models()` says the model's context holds, in tokens (its
    #: `ModelInfo.context_length`); 0 says nothing.
    context_length: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen
class Settings:
    models: list[ScriptedModel] = attrs.field(factory=lambda: [ScriptedModel("scripted")])


class ScriptedProvider:
    name = "scripted"
    #: It scripts function calls (`tool_call`): requests with tools may come (contract 1.4).
    supports_tools = True

    def __init__(self, models: list[ScriptedModel]) -> None:
        self.models = {m.name: m for m in models}
        self.requests: dict[str, int] = {m.name: 0 for m in models}

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name, owned_by="scripted", context_length=m.context_length or None) for name, m in self.models.items()]

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        model = self.models[request.model]
        self.requests[model.name] += 1
        prompt_tokens = sum(len(_WORDS.findall(message_text(m))) for m in request.messages)
        if model.first_delay:
            await trio.sleep(model.first_delay)
        if self.requests[model.name] <= model.fail_first:
            raise UpstreamError(
                f"scripted failure {self.requests[model.name]} of {model.fail_first}", status=model.error_status
            )
        last = request.messages[-1]
        if model.tool_call and request.extra.get("tools") and last.get("role") != "tool":
            arguments = model.tool_arguments
            call_id = f"call_{request.session_id.removeprefix('sess_')[:12] or self.requests[model.name]}"
            yield Delta(tool_calls=[{"index": 0, "id": call_id, "type": "function", "function": {"name": model.tool_call, "arguments": ""}}])
            for start in range(0, len(arguments), 8):
                yield Delta(tool_calls=[{"index": 0, "function": {"arguments": arguments[start : start + 8]}}], usage=Usage(prompt_tokens, start // 8 + 1))
            yield Delta(finish_reason="tool_calls")
            return
        if model.echo:
            users = [m for m in request.messages if m.get("role") == "user"]
            text = message_text(users[-1]) if users else ""
        elif model.tool_call and last.get("role") == "tool":
            text = f"The tool said: {message_text(last)}"
        else:
            text = model.text
        reasoning = _WORDS.findall(model.reasoning)
        words = _WORDS.findall(text) * model.repeat
        limit = request.max_tokens if request.max_tokens is not None else len(reasoning) + len(words)
        sent = 0
        finish = model.finish_reason
        for kind, word in [("reasoning", w) for w in reasoning] + [("content", w) for w in words]:
            if sent >= limit:
                finish = "length"
                break
            if sent and model.delay:
                await trio.sleep(model.delay)
            if sent == model.fail_after:
                raise UpstreamError(f"scripted failure after {sent} chunks", status=model.error_status)
            sent += 1
            usage = Usage(prompt_tokens, sent, min(sent, len(reasoning)))
            if kind == "reasoning":
                yield Delta(reasoning=word, usage=usage)
            else:
                yield Delta(content=word, usage=usage)
        else:
            if sent == model.fail_after:
                raise UpstreamError(f"scripted failure after {sent} chunks", status=model.error_status)
        yield Delta(finish_reason=finish)


class ScriptedPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.provider = ScriptedProvider(settings.models)

    @hookimpl
    def register_providers(self, register):
        register(self.provider)
