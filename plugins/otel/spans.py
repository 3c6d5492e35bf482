"""The otel plugin's spans, made as the SDK's `ReadableSpan`s when they end.

A request's spans have one shape, known in advance, and the plugin writes
every attribute itself. The SDK's `Tracer` makes each span a live object
(a lock, every attribute checked as it is set, a sampler object asked, the
span processors told at its start and at its end): about 55 us of the
server's CPU per span, more than the rest of the plugin together. Here an open
span is only its ids (a `SpanContext`); it is built once, as the
`ReadableSpan` that span processors and exporters take, when it ends. The
sampling is the SDK's default: a client's sampled flag is followed, and a new
trace is kept when its id falls under the ratio (`TraceIdRatioBased`).
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["InstrumentationScope", "SpanMaker"]

_UNSET = Status(StatusCode.UNSET)
_KINDS = {"server": SpanKind.SERVER, "internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_LOW_64 = (1 << 64) - 1
_extract = TraceContextTextMapPropagator().extract
_bits = random.getrandbits


def _span_id() -> int:
    span_id = _bits(64)
    while not span_id:
        span_id = _bits(64)
    return span_id


def _trace_id() -> int:
    trace_id = _bits(128)
    while not trace_id:
        trace_id = _bits(128)
    return trace_id


class SpanMaker:
    """Ids for new spans, and the finished spans handed to `processor`."""

    def __init__(self, resource: Any, scope: InstrumentationScope, sampling_ratio: float, processor: Any) -> None:
        self.resource = resource
        self.scope = scope
        #: As TraceIdRatioBased: a new trace is sampled when the low 64 bits of its id are under this.
        self.bound = round(sampling_ratio * (1 << 64))
        self.processor = processor

    def root(self, headers: Mapping[str, str]) -> tuple[SpanContext | None, SpanContext]:
        """The client's span context from its W3C headers (None when it sent
        none, or a malformed one), and a new span's under it, or at the root
        of a new trace."""
        parent = None
        if headers:
            remote = get_current_span(_extract(headers)).get_span_context()
            if remote.is_valid:
                parent = remote
        if parent is None:
            trace_id = _trace_id()
            flags = _SAMPLED if (trace_id & _LOW_64) < self.bound else _NOT_SAMPLED
            return None, SpanContext(trace_id, _span_id(), False, flags)
        flags = _SAMPLED if parent.trace_flags.sampled else _NOT_SAMPLED
        return parent, SpanContext(parent.trace_id, _span_id(), False, flags, parent.trace_state)

    def child(self, parent: SpanContext) -> SpanContext:
        return SpanContext(parent.trace_id, _span_id(), False, parent.trace_flags, parent.trace_state)

    @staticmethod
    def headers(context: SpanContext) -> dict[str, str]:
        """The W3C headers that make `context` the parent, as the propagator writes them."""
        headers = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
        if context.trace_state:
            headers["tracestate"] = context.trace_state.to_header()
        return headers

    @staticmethod
    def event(name: str, attributes: Mapping[str, Any] | None, at: int) -> SpanEvent:
        return SpanEvent(name, attributes, at)

    def finish(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: str,
        start: int,
        end: int,
        attributes: Mapping[str, Any],
        events: Sequence[SpanEvent] = (),
        error: str | None = None,
    ) -> None:
        """Hand the ended span to the processor, when its trace is sampled.
        `kind` is "server", "internal" or "client"; `error` makes its status
        ERROR with that description. Attribute values must be what
        OpenTelemetry takes: str, bool, int, float, or a tuple of one of them."""
        if self.processor is None or not context.trace_flags.sampled:
            return
        self.processor.on_end(
            ReadableSpan(
                name=name, context=context, parent=parent, resource=self.resource, attributes=attributes, events=events,
                kind=_KINDS[kind], status=_UNSET if error is None else Status(StatusCode.ERROR, error), start_time=start, end_time=end,
                instrumentation_scope=self.scope,
            )
        )
