"""streamvisor-example-plugin: a complete third-party streamvisor plugin.

It is installed like any package and announces itself in the entry-point group
``streamvisor`` (see its pyproject.toml)::

    [project.entry-points.streamvisor]
    example = "streamvisor_example_plugin:ExamplePlugin"

Installed code runs only when plugins.toml names it; the table's keys are the
fields of `ExamplePlugin.Settings`, checked against their types at start-up::

    [plugins.example]
    greeting = "Howdy"          # default "Hello"
    model = "example-reverse"   # the model name clients ask for

It adds:

* a model that streams the last user message reversed, prefixed by the greeting,
  one word per chunk, with exact usage (a token is a word here);
* ``GET /example/hello``, which answers ``{"plugin": "example", "greeting": ...}``;
* a status panel, ``replies``: how many answers the model gave.

It uses only the public contract, `streamvisor.hooks` (contract 1.0), and its
tests (``tests/``) the kit's fixtures, `streamvisor.testing`.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

import attrs

from streamvisor.hooks import ChatRequest, Delta, InvalidRequest, ModelInfo, Usage, hookimpl, message_text

_WORDS = re.compile(r"\s*\S+")  # a word with the whitespace before it


@attrs.frozen
class Settings:
    greeting: str = "Hello"
    model: str = "example-reverse"


class ReverseProvider:
    """A provider: a `name`, `list_models()` and a `stream(request)` of `Delta`s."""

    name = "example"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replies = 0

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(self.settings.model, owned_by="example")]

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        users = [m for m in request.messages if m.get("role") == "user"]
        if not users:
            # An APIError raised before the first delta is the client's error response.
            raise InvalidRequest("the example model needs a user message", param="messages")
        words = _WORDS.findall(f"{self.settings.greeting} {message_text(users[-1])[::-1]}")
        prompt_tokens = sum(len(_WORDS.findall(message_text(m))) for m in request.messages)
        limit = request.max_tokens or len(words)
        for sent, word in enumerate(words[:limit], start=1):
            # Usage is cumulative; the last one seen is what the session records.
            yield Delta(content=word, usage=Usage(prompt_tokens, sent))
        self.replies += 1
        yield Delta(finish_reason="length" if limit < len(words) else "stop")


class ExamplePlugin:
    """Constructed by streamvisor with the validated `[plugins.example]` table."""

    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.provider = ReverseProvider(settings)

    @hookimpl
    def register_providers(self, register):
        register(self.provider)

    @hookimpl
    def register_routes(self, register):
        async def hello() -> dict[str, Any]:
            return {"plugin": "example", "greeting": self.settings.greeting}  # quart sends a dict as JSON

        # What GET /openapi.json says of the route: an OpenAPI operation object.
        register(
            "/example/hello",
            hello,
            openapi={
                "summary": "Say hello",
                "responses": {
                    "200": {
                        "description": "The plugin's greeting.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"plugin": {"const": "example"}, "greeting": {"type": "string"}},
                                }
                            }
                        },
                    }
                },
            },
        )

    @hookimpl
    def register_status_panels(self, register):
        register("replies", lambda: {"replies": self.provider.replies})
