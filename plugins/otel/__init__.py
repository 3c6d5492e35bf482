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
- a span for a response-cache hit.

The spans are made from what the runtime tells every plugin: the session's
start (a chunk-transformer factory, which transforms nothing), a middleware
placed after the retry plugin (it sees each attempt), and the session's events
(first token, retries, fallbacks, cache hits, the end). Nothing runs per chunk.
Exporting is the SDK's bounded batch processor in its own thread: when the
collector is down, spans are dropped and counted, and no stream waits.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Callable, Mapping

import attrs
import trio

from streamvisor.hooks import ConfigError, Delta, Event, Health, Session, hookimpl, listens_to, positive

log = logging.getLogger("streamvisor.otel")

__all__ = ["OtelPlugin", "Settings", "SEMCONV_VERSION"]

#: The OpenTelemetry GenAI semantic conventions the attributes follow.
SEMCONV_VERSION = "1.37.0"
#: Live sessions whose spans are open at most (past it, a session gets no trace).
MAX_OPEN = 100_000


def _ratio(instance: Any, attribute: Any, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError("sampling_ratio is a fraction from 0 to 1")


@attrs.frozen
class Settings:
    #: "otlp_http" (the default), "otlp_grpc" (when the gRPC exporter is
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
    #: Spans waiting for export at most; past it they are dropped and counted.
    max_queue: int = attrs.field(default=8192, validator=positive)
    max_batch: int = attrs.field(default=512, validator=positive)
    #: How long the exporter waits between batches, and for one export.
    schedule_ms: int = attrs.field(default=1000, validator=positive)
    export_timeout_ms: int = attrs.field(default=10_000, validator=positive)


@attrs.define(eq=False)
class _Trace:
    server: Any
    session: Any
    attempts: int = 0


class OtelPlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.provider: Any = None
        self.tracer: Any = None
        #: The exporter="memory" spans (tests).
        self.memory: Any = None
        self._open: dict[str, _Trace] = {}
        self.counts = {"exported": 0, "export_failures": 0, "ended": 0, "untraced": 0}

    # -- set-up ----------------------------------------------------------------------------

    @hookimpl
    def register_middleware(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        self._setup(runtime)
        register(self.middleware)

    def _setup(self, runtime: Any) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        settings = self.settings
        attributes = dict(settings.resource_attributes)
        if settings.service_name:
            attributes["service.name"] = settings.service_name
        resource = Resource.create(attributes)
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "streamvisor"}))
        resource = resource.merge(Resource({"service.instance.id": runtime.instance_id}))
        # A provider of our own, not the global one: two servers in one process
        # (tests) do not share traces, and the application's globals stay theirs.
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sampling_ratio)))
        exporter = self._exporter(runtime)
        if exporter is not None:
            if settings.exporter == "memory":
                self.provider.add_span_processor(SimpleSpanProcessor(exporter))
            else:
                self.provider.add_span_processor(
                    BatchSpanProcessor(
                        _Counting(exporter, self.counts), max_queue_size=settings.max_queue, max_export_batch_size=min(settings.max_batch, settings.max_queue),
                        schedule_delay_millis=settings.schedule_ms, export_timeout_millis=settings.export_timeout_ms,
                    )
                )
        self.tracer = self.provider.get_tracer("streamvisor", schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}")

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
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(runtime.config.source, "plugins.otel.exporter", f"an installed exporter for {kind!r}", str(exc)) from None
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
    async def shutdown(self) -> None:
        provider = self.provider
        if provider is None:
            return
        # What is queued goes out (bounded by the shutdown's grace period), in
        # the exporter's own thread.
        with trio.move_on_after(3):
            await trio.to_thread.run_sync(provider.force_flush, 2000, abandon_on_cancel=True)
        await trio.to_thread.run_sync(provider.shutdown, abandon_on_cancel=True)

    # -- the spans -------------------------------------------------------------------------

    def begin(self, session: Session) -> None:
        """The chunk-transformer factory: open the request's and the session's
        spans as the session starts. It transforms nothing."""
        if len(self._open) >= MAX_OPEN:
            self.counts["untraced"] += 1
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        request = session.request
        parent = TraceContextTextMapPropagator().extract(dict(request.trace_headers)) if request.trace_headers else None
        start = int(session.created_at * 1e9)
        server = self.tracer.start_span(
            "POST /v1/chat/completions", context=parent, kind=trace.SpanKind.SERVER, start_time=start,
            attributes={"http.request.method": "POST", "http.route": "/v1/chat/completions", "streamvisor.request_id": session.request_id},
        )
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": request.model,
            "gen_ai.provider.name": session.provider or "",
            "gen_ai.system": session.provider or "",
            "streamvisor.session_id": session.id,
            "streamvisor.request_id": session.request_id,
            "streamvisor.identity": session.identity,
            "streamvisor.background": session.background,
        }
        for name, value in (("max_tokens", request.max_tokens), ("temperature", request.temperature), ("top_p", request.top_p), ("seed", request.seed)):
            if value is not None:
                attributes[f"gen_ai.request.{name}"] = value
        if request.stop:
            attributes["gen_ai.request.stop_sequences"] = list(request.stop)
        if session.key_id:
            attributes["streamvisor.key_id"] = session.key_id
        if self.settings.capture_content:
            attributes["gen_ai.input.messages"] = _json(list(request.messages))
        span = self.tracer.start_span(f"chat {request.model}", context=trace.set_span_in_context(server), kind=trace.SpanKind.INTERNAL, start_time=start, attributes=attributes)
        self._open[session.id] = _Trace(server, span)
        return None

    def middleware(self, request: Any, call_next: Callable[[Any], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        traced = self._open.get(session.id)
        if traced is None:
            return call_next(request)
        return self._attempt(traced, request, call_next, session)

    async def _attempt(self, traced: _Trace, request: Any, call_next: Callable[[Any], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        """One upstream call: a CLIENT span, and its `traceparent` sent upstream."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        traced.attempts += 1
        try:
            provider = self.runtime.providers.resolve(request.model).provider.name
        except Exception:
            provider = ""
        span = self.tracer.start_span(
            f"chat {request.model}", context=trace.set_span_in_context(traced.session), kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": request.model, "gen_ai.provider.name": provider, "gen_ai.system": provider,
                "streamvisor.attempt": traced.attempts,
            },
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        request = attrs.evolve(request, upstream_headers={**request.upstream_headers, **carrier})
        first = True
        finish: str | None = None
        usage = None
        try:
            async for delta in call_next(request):
                if first:
                    first = False
                    span.add_event("gen_ai.first_token")
                if delta.finish_reason:
                    finish = delta.finish_reason
                if delta.usage is not None:
                    usage = delta.usage
                yield delta
        except trio.Cancelled:
            span.add_event("cancelled", {"reason": session.cancel_reason or "cancelled"})
            raise
        except GeneratorExit:
            span.add_event("closed")
            raise
        except BaseException as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:500]))
            span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            if finish is not None:
                span.set_attribute("gen_ai.response.finish_reasons", [finish])
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            span.end()

    @hookimpl
    @listens_to(exclude=("created", "started", "chunk"))
    def on_event(self, event: Event) -> None:
        traced = self._open.get(event.session_id)
        if traced is None:
            return
        at = int(event.at * 1e9)
        span = traced.session
        if event.type == "first_token":
            span.add_event("gen_ai.first_token", timestamp=at)
        elif event.outcome is not None:
            self._end(event, traced, at)
        elif event.type == "cache_hit":
            from opentelemetry import trace

            hit = self.tracer.start_span(
                "cache lookup", context=trace.set_span_in_context(span), start_time=at,
                attributes={"streamvisor.cache.hit": True, **{f"streamvisor.cache.{k}": v for k, v in event.data.items() if isinstance(v, (str, int, float, bool))}},
            )
            hit.end(end_time=at)
        else:
            span.add_event(event.type, {k: v for k, v in event.data.items() if isinstance(v, (str, int, float, bool))}, timestamp=at)

    def _end(self, event: Event, traced: _Trace, at: int) -> None:
        from opentelemetry import trace

        self._open.pop(event.session_id, None)
        outcome = event.outcome
        assert outcome is not None
        span = traced.session
        usage = outcome.usage
        span.set_attribute("gen_ai.response.model", event.model)
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        if usage.reasoning_tokens:
            span.set_attribute("gen_ai.usage.reasoning_tokens", usage.reasoning_tokens)
        if usage.cost_usd is not None:
            span.set_attribute("streamvisor.cost_usd", usage.cost_usd)
        span.set_attribute("streamvisor.usage.exact", usage.exact)
        if outcome.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [outcome.finish_reason])
        if outcome.first_token_ms is not None:
            span.set_attribute("streamvisor.time_to_first_token_ms", outcome.first_token_ms)
        span.set_attribute("streamvisor.state", outcome.state)
        span.set_attribute("streamvisor.attempts", traced.attempts)
        if outcome.state in ("stopped", "disconnected"):
            span.add_event(outcome.reason or outcome.state, timestamp=at)
        if outcome.state == "failed":
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error or "failed"))
            span.set_attribute("error.type", outcome.error_code or "failed")
            traced.server.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error or "failed"))
        span.end(end_time=at)
        traced.server.end(end_time=at)
        self.counts["ended"] += 1

    # -- status ----------------------------------------------------------------------------

    async def check(self) -> Health:
        failures = self.counts["export_failures"]
        return Health(True, f"{self.counts['exported']} spans exported, {failures} export failures, {len(self._open)} traces open")

    def panel(self) -> dict[str, Any]:
        return {"exporter": self.settings.exporter, "open_traces": len(self._open), **self.counts}


class _Counting:
    """An exporter that counts what it exported and what failed (the batch
    processor drops what does not fit its queue; those are the rest)."""

    def __init__(self, inner: Any, counts: dict[str, int]) -> None:
        self.inner = inner
        self.counts = counts

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self.counts["exported"] += len(spans)
        else:
            self.counts["export_failures"] += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self.inner, "force_flush", None)
        return True if flush is None else flush(timeout_millis)


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, default=str).decode()
