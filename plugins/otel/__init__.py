"""The `otel` plugin: every stream a trace, in the OpenTelemetry GenAI
semantic conventions, exported over OTLP.

One trace per chat request, continuing the client's `traceparent` when it sent
one:

- a SERVER span for the request (`POST /v1/chat/completions`), from the
  session's creation to its end;
- under it, the session's span (`chat {model}`, INTERNAL), with the request's
  GenAI attributes, its usage, finish reason and time to the first token, an
  event for the first token, for each retry and fallback (with the reason), and
  for a stop or disconnect;
- under that, one CLIENT span per upstream attempt (retries and fallbacks
  each get one, with the provider and model they called), which sends its own
  `traceparent` upstream, so a vLLM or another gateway behind us joins the
  trace;
- a span for the response cache's lookup, hit or miss.

The spans are made from what the runtime tells every plugin: the session's
start (a chunk-transformer factory, which transforms nothing), a middleware
placed after the cache and retry plugins (it sees each attempt, and the
cache's X-Cache header), and the session's events (retries, fallbacks, cache
hits, the end, which says when the first token came). Per chunk there is only
the attempt's pass-through. Log lines of a session carry its trace and span
ids (`add_log_fields`).

Spans are built as the SDK's `ReadableSpan`s when they end (`spans.py`: the
SDK's live spans cost more than everything else here), exported by the SDK's
batch processor in its own thread, behind a gate that keeps at most
`max_queue` spans waiting or in flight (`export.py`): when the collector is
down or slow, spans past it are dropped and counted, and no stream waits.
OTLP/HTTP is encoded by `otlp.py`, four times faster than the SDK's encoder.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Mapping

import attrs
import trio

from streamvisor.hooks import ConfigError, Delta, Event, Health, Session, add_log_fields, hookimpl, listens_to, positive

from .export import SpanExport

log = logging.getLogger("streamvisor.otel")

__all__ = ["OtelPlugin", "Settings", "SEMCONV_VERSION"]

#: The OpenTelemetry GenAI semantic conventions the attributes follow.
SEMCONV_VERSION = "1.37.0"
#: Live sessions whose spans are open at most (past it, a session gets no trace).
MAX_OPEN = 100_000
#: Finished sessions whose trace ids log lines still get (the access line of a
#: request that waited for its session's end is written after it).
MAX_RECENT = 4096
#: What to install for exporter = "otlp_grpc".
GRPC_EXTRA = "streamvisor[otel-grpc]"


def _ratio(instance: Any, attribute: Any, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError("sampling_ratio is a fraction from 0 to 1")


@attrs.frozen
class Settings:
    #: "otlp_http" (the default), "otlp_grpc" (with the otel-grpc extra
    #: installed), "console" (print spans), "memory" (keep them: tests), "none".
    exporter: str = attrs.field(default="otlp_http", validator=attrs.validators.in_(("otlp_http", "otlp_grpc", "console", "memory", "none")))
    #: The collector's traces URL; empty: the exporter's default and the
    #: standard OTEL_EXPORTER_OTLP_* environment variables.
    endpoint: str = ""
    #: Headers for the collector (an API key: "${HONEYCOMB_KEY}").
    headers: dict[str, str] = attrs.field(factory=dict)
    #: service.name; empty: OTEL_SERVICE_NAME, else "streamvisor".
    service_name: str = ""
    #: The share of traces kept (a client's sampled flag is followed when it sends one).
    sampling_ratio: float = attrs.field(default=1.0, validator=_ratio)
    #: More resource attributes (deployment.environment, ...), on top of OTEL_RESOURCE_ATTRIBUTES.
    resource_attributes: dict[str, str] = attrs.field(factory=dict)
    #: Record prompts and completions on the spans (they may hold anything).
    capture_content: bool = False
    #: Spans waiting for export or being exported at most; past it they are
    #: dropped and counted.
    max_queue: int = attrs.field(default=8192, validator=positive)
    max_batch: int = attrs.field(default=512, validator=positive)
    #: How long the exporter waits between batches, and for one export.
    schedule_ms: int = attrs.field(default=1000, validator=positive)
    export_timeout_ms: int = attrs.field(default=10_000, validator=positive)


@attrs.define(eq=False)
class _Trace:
    """A request's open spans: the SERVER span's and the session span's ids,
    and what the session span will be made of when it ends."""

    #: The client's span, when it sent a traceparent.
    parent: Any
    server: Any
    session: Any
    #: When the session was created, and when its middleware chain began (ns
    #: since the epoch): a cache lookup starts there.
    start: int
    begun: int
    server_attributes: dict[str, Any]
    attributes: dict[str, Any]
    events: list[Any] = attrs.field(factory=list)
    attempts: int = 0


class OtelPlugin:
    Settings = Settings
    streamvisor_contract = "1.6"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        #: Makes span ids and hands finished spans on (set up with the middleware).
        self.spans: Any = None
        #: The exporter="memory" spans (tests).
        self.memory: Any = None
        #: The span processor: the bounded export, or the memory exporter's.
        self.processor: Any = None
        self._open: dict[str, _Trace] = {}
        #: The session span contexts of the last MAX_RECENT sessions ended, for their log lines.
        self._recent: dict[str, Any] = {}
        self.counts = {"ended": 0, "untraced": 0}
        #: The way out (None for the memory and none exporters).
        self.export: SpanExport | None = None
        self._forget_log_fields: Callable[[], None] | None = None

    # -- set-up ----------------------------------------------------------------------------

    @hookimpl
    def register_middleware(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        self._setup(runtime)
        register(self.middleware)

    def _setup(self, runtime: Any) -> None:
        # OpenTelemetry is imported when the plugin runs, not when it is listed.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        from .spans import InstrumentationScope, SpanMaker

        settings = self.settings
        attributes = dict(settings.resource_attributes)
        if settings.service_name:
            attributes["service.name"] = settings.service_name
        resource = Resource.create(attributes)
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "streamvisor"}))
        resource = resource.merge(Resource({"service.instance.id": runtime.instance_id}))
        # A pipeline of our own, not the global tracer provider: two servers in
        # one process (tests) do not share traces, and the application's
        # globals stay theirs.
        exporter = self._exporter(runtime)
        if exporter is not None:
            if settings.exporter == "memory":
                self.processor = SimpleSpanProcessor(exporter)
            else:
                self.processor = self.export = SpanExport(exporter, settings, runtime.metrics)
        scope = InstrumentationScope("streamvisor", None, f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}")
        self.spans = SpanMaker(resource, scope, settings.sampling_ratio, self.processor)

    def _exporter(self, runtime: Any) -> Any:
        kind = self.settings.exporter
        if kind == "none":
            return None
        if kind == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory = InMemorySpanExporter()
            return self.memory
        if kind == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        options: dict[str, Any] = {}
        if self.settings.endpoint:
            options["endpoint"] = self.settings.endpoint
        if self.settings.headers:
            options["headers"] = dict(self.settings.headers)
        options["timeout"] = self.settings.export_timeout_ms / 1000
        try:
            if kind == "otlp_grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from .otlp import http_exporter as OTLPSpanExporter
        except ImportError as exc:
            expected = f"an installed gRPC exporter (pip install '{GRPC_EXTRA}')" if kind == "otlp_grpc" else f"an installed exporter for {kind!r}"
            raise ConfigError(runtime.config.source, "plugins.otel.exporter", expected, f"{kind!r}, and {exc}") from None
        return OTLPSpanExporter(**options)

    @hookimpl
    def register_chunk_transformers(self, register: Any) -> None:
        register(self.begin)

    @hookimpl
    def register_health_checks(self, register: Any) -> None:
        register("exporter", self.check)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("spans", self.panel)

    @hookimpl
    def startup(self) -> None:
        self._forget_log_fields = add_log_fields(self.log_fields)

    @hookimpl
    async def shutdown(self) -> None:
        if self._forget_log_fields is not None:
            self._forget_log_fields()
        processor = self.processor
        if processor is None:
            return
        export = self.export
        # What is queued goes out, in a thread, for 2 s at most (and within the
        # shutdown's grace period); not when the collector is down or stuck.
        with trio.move_on_after(2) as scope:
            async with trio.open_nursery() as nursery:

                async def flush() -> None:
                    await trio.to_thread.run_sync(processor.force_flush, 2000, abandon_on_cancel=True)
                    scope.cancel()

                nursery.start_soon(flush)
                while export is None or not export.stalled():
                    await trio.sleep(0.05)
                scope.cancel()
        if export is not None:
            # An export still retrying gives up now: the rest is counted as failed.
            export.close()
        await trio.to_thread.run_sync(processor.shutdown, abandon_on_cancel=True)

    # -- the spans -------------------------------------------------------------------------

    def begin(self, session: Session) -> None:
        """The chunk-transformer factory: open the request's and the session's
        spans as the session starts. It transforms nothing."""
        if len(self._open) >= MAX_OPEN:
            self.counts["untraced"] += 1
            return None
        request = session.request
        parent, server = self.spans.root(request.trace_headers)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": request.model,
            "gen_ai.provider.name": session.provider or "",
            "gen_ai.system": session.provider or "",
            "streamvisor.session_id": session.id,
            "streamvisor.request_id": session.request_id or "",
            "streamvisor.identity": session.identity or "",
        }
        for name, value in (("max_tokens", request.max_tokens), ("temperature", request.temperature), ("top_p", request.top_p), ("seed", request.seed)):
            if value is not None:
                attributes[f"gen_ai.request.{name}"] = value
        if request.stop:
            attributes["gen_ai.request.stop_sequences"] = tuple(str(stop) for stop in request.stop)
        if session.key_id:
            attributes["streamvisor.key_id"] = session.key_id
        if session.background:
            attributes["streamvisor.background"] = True
        if self.settings.capture_content:
            attributes["gen_ai.input.messages"] = _json(list(request.messages))
        self._open[session.id] = _Trace(
            parent, server, self.spans.child(server), int(session.created_at * 1e9), time.time_ns(),
            {"http.request.method": "POST", "http.route": "/v1/chat/completions", "streamvisor.request_id": session.request_id or ""}, attributes,
        )
        return None

    def middleware(self, request: Any, call_next: Callable[[Any], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        traced = self._open.get(session.id)
        if traced is None:
            return call_next(request)
        return self._attempt(traced, request, call_next, session)

    async def _attempt(self, traced: _Trace, request: Any, call_next: Callable[[Any], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        """One upstream call: a CLIENT span, and its `traceparent` sent upstream."""
        spans = self.spans
        start = time.time_ns()
        traced.attempts += 1
        if traced.attempts == 1:
            self._cache_answer(traced, session, start)
        try:
            provider = self.runtime.providers.resolve(request.model, request.provider).provider.name
        except Exception:
            provider = ""
        context = spans.child(traced.session)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": request.model, "gen_ai.provider.name": provider, "gen_ai.system": provider,
            "streamvisor.attempt": traced.attempts,
        }
        events: list[Any] = []
        error: str | None = None
        request = attrs.evolve(request, upstream_headers={**request.upstream_headers, **spans.headers(context)})
        first = True
        finish: str | None = None
        usage = None
        try:
            async with aclosing(call_next(request)) as stream:
                async for delta in stream:
                    if first:
                        first = False
                        events.append(spans.event("gen_ai.first_token", None, time.time_ns()))
                    if delta.finish_reason:
                        finish = delta.finish_reason
                    if delta.usage is not None:
                        usage = delta.usage
                    yield delta
        except trio.Cancelled:
            events.append(spans.event("cancelled", {"reason": session.cancel_reason or "cancelled"}, time.time_ns()))
            raise
        except GeneratorExit:
            events.append(spans.event("closed", None, time.time_ns()))
            raise
        except BaseException as exc:
            error = str(exc)[:500]
            attributes["error.type"] = str(getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            if usage is not None:
                attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
            if finish is not None:
                attributes["gen_ai.response.finish_reasons"] = (finish,)
            spans.finish(f"chat {request.model}", context, traced.session, "client", start, time.time_ns(), attributes, events, error)

    def _cache_answer(self, traced: _Trace, session: Session, now: int) -> None:
        """Before the first upstream call, what the response cache said (its
        X-Cache header): on a miss, a lookup span from the start of the
        middleware chain to now; a bypass is an attribute only."""
        headers = session.headers
        result = headers.get("X-Cache")
        if result is None:
            return
        traced.attributes["streamvisor.cache.result"] = result
        if result == "miss":
            self._cache_span(traced, now, {"streamvisor.cache.hit": False, "streamvisor.cache.key": headers.get("X-Cache-Key", "")})

    def _cache_span(self, traced: _Trace, end: int, attributes: dict[str, Any]) -> None:
        spans = self.spans
        spans.finish("cache lookup", spans.child(traced.session), traced.session, "internal", min(traced.begun, end), end, attributes)

    @hookimpl
    @listens_to(exclude=("created", "started", "chunk", "first_token"))
    def on_event(self, event: Event) -> None:
        # Not the first token: the session's end says when it came, and one
        # wake-up of this listener per request is enough.
        traced = self._open.get(event.session_id)
        if traced is None:
            return
        at = int(event.at * 1e9)
        if event.outcome is not None:
            self._end(event, traced, at)
        elif event.type == "cache_hit":
            traced.attributes["streamvisor.cache.result"] = "hit"
            self._cache_span(traced, at, {"streamvisor.cache.hit": True, **{f"streamvisor.cache.{k}": v for k, v in event.data.items() if _primitive(v)}})
        else:
            traced.events.append(self.spans.event(event.type, {k: v for k, v in event.data.items() if _primitive(v)}, at))

    def _end(self, event: Event, traced: _Trace, at: int) -> None:
        spans = self.spans
        self._open.pop(event.session_id, None)
        recent = self._recent
        recent[event.session_id] = traced.session
        if len(recent) > MAX_RECENT:
            del recent[next(iter(recent))]
        outcome = event.outcome
        assert outcome is not None
        usage = outcome.usage
        attributes = traced.attributes
        attributes.update({
            "gen_ai.response.model": event.model,
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "streamvisor.usage.exact": usage.exact,
            "streamvisor.state": outcome.state,
            "streamvisor.attempts": traced.attempts,
        })
        if usage.reasoning_tokens:
            attributes["gen_ai.usage.reasoning_tokens"] = usage.reasoning_tokens
        if usage.cost_usd is not None:
            attributes["streamvisor.cost_usd"] = float(usage.cost_usd)
        if outcome.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = (outcome.finish_reason,)
        events = traced.events
        if outcome.first_token_ms is not None:
            attributes["streamvisor.time_to_first_token_ms"] = outcome.first_token_ms
            events.append(spans.event("gen_ai.first_token", None, traced.start + int(outcome.first_token_ms * 1e6)))
            events.sort(key=lambda e: e.timestamp)
        if outcome.state in ("stopped", "disconnected"):
            events.append(spans.event(outcome.reason or outcome.state, None, at))
        error = None
        if outcome.state == "failed":
            error = outcome.error or "failed"
            attributes["error.type"] = outcome.error_code or "failed"
        spans.finish(f"chat {attributes['gen_ai.request.model']}", traced.session, traced.server, "internal", traced.start, at, attributes, events, error)
        spans.finish("POST /v1/chat/completions", traced.server, traced.parent, "server", traced.start, at, traced.server_attributes, (), error)
        self.counts["ended"] += 1

    # -- logs ------------------------------------------------------------------------------

    def log_fields(self, record: Any) -> Mapping[str, str] | None:
        """The trace and span ids of the session a log line belongs to (its
        session id): the session's span, while it is open and for the last
        MAX_RECENT sessions ended. Called for every log line of the process."""
        session_id = record.session_id
        traced = self._open.get(session_id)
        context = traced.session if traced is not None else self._recent.get(session_id)
        if context is None:
            return None
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

    # -- status ----------------------------------------------------------------------------

    def _counts(self) -> dict[str, int]:
        return {**self.counts, **(self.export.counts() if self.export is not None else {})}

    async def check(self) -> Health:
        counts = self._counts()
        return Health(
            True,
            f"{counts.get('exported', 0)} spans exported, {counts.get('export_failures', 0)} failed, "
            f"{counts.get('dropped', 0)} dropped, {len(self._open)} traces open",
        )

    def panel(self) -> dict[str, Any]:
        return {"exporter": self.settings.exporter, "open_traces": len(self._open), **self._counts()}


def _primitive(value: Any) -> bool:
    """Whether `value` may be an attribute as it is."""
    return isinstance(value, (str, bool, int, float))


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, default=str).decode()
