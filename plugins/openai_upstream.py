"""The `openai` provider: any OpenAI-compatible server as an upstream.

vLLM, llama.cpp's server, Ollama or a hosted API: each upstream has a base URL, an
API key (usually `${NAME}` from the environment), explicit timeouts and a pool of
keep-alive connections (`streamvisor.core.httpclient`, a lean HTTP/1.1 client:
httpx cost half the gateway's CPU per request, see docs/performance.md). Its
models are the configured names and aliases, or, when none are
configured, whatever its `/models` lists at start-up.

Every call streams from the upstream (with `include_usage`), whether the client
asked for a stream or not, so one code path serves both and usage is exact when
the upstream reports it. Cancelling the session exits the `client.stream` block,
which closes the upstream connection at once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import attrs
import orjson

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    Delta,
    Health,
    ModelInfo,
    RateLimited,
    SSEBoundError,
    SSEDecoder,
    UpstreamError,
    UpstreamTimeout,
    Usage,
    hookimpl,
    httpclient,
    positive,
)

log = logging.getLogger("streamvisor.plugins.openai")

_ERROR_BODY_LIMIT = 64 * 1024
_JSON = (("Content-Type", "application/json"),)
#: Content types no OpenAI stream comes in (a proxy's or a login page).
_NOT_A_STREAM = frozenset({"text/html", "application/xhtml+xml"})


def _http_url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    httpclient.check_base_url(value, attribute.name)


def _existing_file(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"{attribute.name}: no file at {value!r}")


def _header_values(instance: Any, attribute: attrs.Attribute, value: dict[str, str]) -> None:
    for name, text in value.items():
        try:
            httpclient.check_header(name, str(text))
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None


@attrs.frozen
class Upstream:
    base_url: str = attrs.field(validator=_http_url)
    name: str = "upstream"
    api_key: str = ""
    #: Model names served as they are.
    models: list[str] = attrs.field(factory=list)
    #: Names clients use, mapped to the upstream's model names.
    aliases: dict[str, str] = attrs.field(factory=dict)
    #: List the upstream's /models at start-up when no models or aliases are given.
    discover: bool = True
    connect_timeout: float = attrs.field(default=5.0, validator=positive)
    #: Longest wait for the next bytes of a response (the gap between chunks).
    read_timeout: float = attrs.field(default=120.0, validator=positive)
    write_timeout: float = attrs.field(default=30.0, validator=positive)
    pool_timeout: float = attrs.field(default=10.0, validator=positive)
    max_connections: int = attrs.field(default=512, validator=positive)
    #: Idle connections kept for reuse (the newest are reused first).
    max_keepalive_connections: int = attrs.field(default=256, validator=positive)
    #: An idle connection is not reused after this long: servers close idle
    #: keep-alive connections (uvicorn after 5 s), and a request written into one
    #: that is closing fails.
    keepalive_expiry: float = attrs.field(default=4.0, validator=positive)
    #: For https:// upstreams: verify the certificate (system CAs, or `ca_file`).
    verify: bool = True
    ca_file: str | None = attrs.field(default=None, validator=_existing_file)
    headers: dict[str, str] = attrs.field(factory=dict, validator=_header_values)
    #: The largest event (and line) of the upstream's stream; a larger one fails
    #: the stream with upstream_error instead of growing the server's memory.
    max_event_bytes: int = attrs.field(default=1024 * 1024, validator=positive)
    #: An event the upstream has begun must end within this many seconds (a
    #: drip of one byte a second never trips read_timeout).
    event_timeout: float = attrs.field(default=60.0, validator=positive)
    #: The longest one response may stream.
    max_stream_seconds: float = attrs.field(default=3600.0, validator=positive)
    #: It takes OpenAI's file content parts (`{"type": "file", "file":
    #: {"filename", "file_data"}}`, a PDF) itself: the files plugin passes a
    #: PDF on instead of its extracted text. Turn off for a server that does
    #: not (vLLM, llama.cpp's server and Ollama do not).
    accepts_files: bool = True


@attrs.frozen
class Settings:
    upstreams: list[Upstream] = attrs.field(factory=list)


def _error_message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    return str(data)[:500]


def _credential_header(name: str) -> bool:
    """Whether a configured header carries a credential (`api-key`, `X-Auth-Token`, ...)."""
    name = name.lower()
    return any(word in name for word in ("auth", "key", "token", "secret", "password", "cookie"))


def _usage(data: Any) -> Usage:
    if not isinstance(data, dict):
        raise TypeError(f"usage is a {type(data).__name__}, not an object")
    details = data.get("completion_tokens_details") or {}
    if not isinstance(details, dict):
        raise TypeError("usage.completion_tokens_details is not an object")
    prompt_details = data.get("prompt_tokens_details") or {}
    if not isinstance(prompt_details, dict):
        raise TypeError("usage.prompt_tokens_details is not an object")
    return Usage(
        prompt_tokens=_count(data.get("prompt_tokens")),
        completion_tokens=_count(data.get("completion_tokens")),
        reasoning_tokens=_count(details.get("reasoning_tokens")),
        cached_tokens=_count(prompt_details.get("cached_tokens")),
    )


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a token count is {value!r}, not a whole number")
    return value


def _parse_chunk(chunk: dict[str, Any]) -> Delta | None:
    """A chat.completion.chunk as a Delta; TypeError or ValueError when a field
    has the wrong type. On the hot path: one dict lookup per field and one type
    test per field present, no call per field."""
    usage = chunk.get("usage")
    choices = chunk.get("choices")
    if not choices:
        if choices is not None and type(choices) is not list:
            raise TypeError(f"choices is a {type(choices).__name__}, not an array")
        return Delta(usage=_usage(usage)) if usage else None
    if type(choices) is not list:
        raise TypeError(f"choices is a {type(choices).__name__}, not an array")
    choice = choices[0]
    if type(choice) is not dict:
        raise TypeError(f"choices[0] is a {type(choice).__name__}, not an object")
    delta = choice.get("delta")
    if delta is None:
        delta = {}
    elif type(delta) is not dict:
        raise TypeError(f"choices[0].delta is a {type(delta).__name__}, not an object")
    content = delta.get("content")
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    role = delta.get("role")
    tool_calls = delta.get("tool_calls")
    finish = choice.get("finish_reason")
    if (
        (content is not None and type(content) is not str)
        or (reasoning is not None and type(reasoning) is not str)
        or (role is not None and type(role) is not str)
        or (tool_calls is not None and type(tool_calls) is not list)
        or (finish is not None and type(finish) is not str)
    ):
        raise TypeError(
            "a field of the delta has the wrong type: content, reasoning_content and role must be strings, "
            "tool_calls an array, finish_reason a string"
        )
    return Delta(content, reasoning, role, tool_calls, finish, _usage(usage) if usage else None)


def _proxy_for(url: str) -> str | None:
    """The proxy variable that would apply to `url` (httpx and curl honour them;
    our client does not, and says so rather than ignore them silently)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    for name in (f"{parts.scheme.upper()}_PROXY", f"{parts.scheme}_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            return name
    return None


class OpenAIUpstream:
    """One OpenAI-compatible upstream, registered as a provider named after it."""

    #: Function tools in a request are passed on (contract 1.4).
    supports_tools = True

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.name = upstream.name
        #: File parts in a request reach the upstream as they are (contract 1.5).
        self.accepts_files = upstream.accepts_files
        proxy = _proxy_for(upstream.base_url)
        if proxy:
            log.warning(
                "upstream %r (%s) is reached directly: %s is set, but streamvisor does not go through proxies",
                upstream.name, upstream.base_url, proxy,
            )
        headers = {"Accept": "text/event-stream", **upstream.headers}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"
        # An upstream's error text may quote the credentials it was sent ("invalid
        # key sk-..."); what it says reaches clients and logs, so they are masked.
        secrets = {upstream.api_key} | {v for k, v in upstream.headers.items() if _credential_header(k)}
        self._secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self.client = httpclient.HTTPClient(
            upstream.base_url,
            headers=headers,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.read_timeout,
            write_timeout=upstream.write_timeout,
            pool_timeout=upstream.pool_timeout,
            max_connections=upstream.max_connections,
            max_idle=upstream.max_keepalive_connections,
            idle_expiry=upstream.keepalive_expiry,
            verify=upstream.verify,
            ca_file=upstream.ca_file,
        )

    async def list_models(self) -> list[ModelInfo]:
        upstream = self.upstream
        models = [ModelInfo(m, owned_by=self.name) for m in upstream.models]
        models += [ModelInfo(alias, target=target, owned_by=self.name) for alias, target in upstream.aliases.items()]
        if models or not upstream.discover:
            return models
        try:
            response, body = await self.client.request("GET", "models")
            if response.status >= 400:
                raise ValueError(f"it answered {response.status}: {self._redact(_error_message(body))}")
            data = orjson.loads(body).get("data", [])
            return [ModelInfo(str(m["id"]), owned_by=self.name) for m in data if isinstance(m, dict) and "id" in m]
        except (httpclient.TransportError, ValueError, AttributeError) as exc:
            log.warning("could not list the models of upstream %r at %s: %s", self.name, upstream.base_url, exc)
            return []

    #: What the admin plugin's provider probe reports having asked.
    probe_method = "GET models"

    async def probe(self) -> Health:
        """Whether the upstream answers `GET models` (the admin plugin's probe;
        `list_models()` answers from the configuration when models are
        configured, so it proves nothing). Any answer but a server error or a
        refused key means the upstream is there and will take requests; a 404 is
        a server without a /models route. Transport errors propagate."""
        response, _ = await self.client.request("GET", "models")
        status = response.status
        ok = status < 500 and status not in (401, 403)
        return Health(ok, f"answered {status}" if ok else f"answered {status} to GET models")

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        upstream = self.upstream
        body = request.to_openai()
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        deadline = time.monotonic() + upstream.max_stream_seconds
        try:
            headers = _JSON if not request.upstream_headers else (*_JSON, *request.upstream_headers.items())
            async with self.client.stream("POST", "chat/completions", body=orjson.dumps(body), headers=headers) as response:
                if response.status >= 400:
                    raise await self._status_error(response)
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind in _NOT_A_STREAM:
                    raise UpstreamError(f"Upstream '{self.name}' answered {response.status} with {kind}, not an event stream.")
                decoder = SSEDecoder(max_line=upstream.max_event_bytes, max_event=upstream.max_event_bytes)
                # A slow drip keeps every read under read_timeout: an event
                # begun must end within event_timeout, and the whole stream
                # within max_stream_seconds.
                event_started: float | None = None
                done = finished = False
                # After [DONE] the body is still read to its end, so that the
                # connection goes back to the pool instead of being closed.
                while raw := await response.receive():
                    now = time.monotonic()
                    if now > deadline:
                        raise UpstreamTimeout(f"Upstream '{self.name}' streamed for longer than max_stream_seconds ({upstream.max_stream_seconds:g} s).")
                    deltas, done, finished, error = self._deltas(decoder.feed(raw), done, finished)
                    for delta in deltas:
                        yield delta
                    if error is not None:
                        raise error
                    if not decoder.pending:
                        event_started = None
                    elif event_started is None:
                        event_started = now
                    elif now - event_started > upstream.event_timeout:
                        raise UpstreamTimeout(f"Upstream '{self.name}' took longer than event_timeout ({upstream.event_timeout:g} s) to send one event.")
                if not done:
                    deltas, done, finished, error = self._deltas(decoder.close(), done, finished)
                    for delta in deltas:
                        yield delta
                    if error is not None:
                        raise error
                if not (done or finished):
                    # The body ended before the answer did: a cut connection, a
                    # proxy's page, anything but an OpenAI stream.
                    raise UpstreamError(f"Upstream '{self.name}' ended its stream before [DONE] or a finish_reason.")
        except httpclient.TimeoutError as exc:
            raise UpstreamTimeout(f"Upstream '{self.name}' timed out: {exc}.") from exc
        except httpclient.TransportError as exc:
            raise UpstreamError(f"Upstream '{self.name}' is unreachable or broke the connection ({type(exc).__name__}: {self._redact(str(exc))}).") from exc
        except SSEBoundError as exc:
            raise UpstreamError(f"Upstream '{self.name}' sent a malformed stream: {exc} (max_event_bytes = {upstream.max_event_bytes}).") from exc

    def _deltas(self, payloads: list[bytes], done: bool, finished: bool) -> tuple[list[Delta], bool, bool, UpstreamError | None]:
        """The deltas of some events' payloads, whether `[DONE]` and a
        finish_reason have been seen (what follows `[DONE]` is ignored), and
        the error of a malformed event, returned rather than raised so that the
        deltas before it still go out."""
        deltas = []
        for data in payloads:
            if done or data == b"[DONE]":
                done = True
                continue
            try:
                delta = self._delta(data)
            except UpstreamError as exc:
                return deltas, done, finished, exc
            if delta is not None:
                finished = finished or delta.finish_reason is not None
                deltas.append(delta)
        return deltas, done, finished, None

    def _delta(self, data: bytes) -> Delta | None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"Upstream '{self.name}' sent a chunk that is not JSON.") from None
        if not isinstance(chunk, dict):
            raise UpstreamError(f"Upstream '{self.name}' sent a chunk that is not a JSON object.")
        if "error" in chunk:
            raise UpstreamError(f"Upstream '{self.name}' failed mid-stream: {self._redact(_error_message(data))}")
        try:
            return _parse_chunk(chunk)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise UpstreamError(f"Upstream '{self.name}' sent a chunk of the wrong shape ({self._redact(str(exc))}).") from None

    async def _status_error(self, response: httpclient.Response) -> APIError:
        body = await response.read(_ERROR_BODY_LIMIT)
        message = f"Upstream '{self.name}' answered {response.status}: {self._redact(_error_message(body))}"
        status = response.status
        if status == 429:
            retry_after = response.headers.get("retry-after")
            return RateLimited(message, headers={"Retry-After": retry_after} if retry_after else None)
        if status in (400, 404, 409, 413, 422):
            # The request itself was refused: the client can act on that.
            return APIError(message, status=status, code="upstream_rejected_request")
        return UpstreamError(message)

    def _redact(self, text: str) -> str:
        """`text` (the upstream's words) with this upstream's credentials masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def aclose(self) -> None:
        await self.client.aclose()


class OpenAIPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.providers = [OpenAIUpstream(u) for u in settings.upstreams]

    @hookimpl
    def register_providers(self, register):
        for provider in self.providers:
            register(provider)
