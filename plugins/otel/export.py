"""The otel plugin's way out: finished spans to the exporter, bounded and counted.

`SpanExport` is the span processor the plugin hands its finished spans to. In
front of the SDK's batch processor (its own thread, batches of `max_batch`
every `schedule_ms`) it lets at most `max_queue` spans wait or be in flight:
past that a span is dropped and counted, before the batch processor would drop
one and log a line for it. What went out, what failed and what was dropped are
counted, here and as `streamvisor_otel_spans_total{result}` on /metrics.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SpanExport"]


class SpanExport:
    """The way out: a span processor in front of the SDK's batch processor
    that lets at most `max_queue` spans be waiting or in flight (past it a span
    is dropped and counted, before the batch processor would drop one and log
    a line for it), and, through `_Exporter`, the real exporter, counting what
    went out and what failed. The trio thread calls `on_end` (accepted,
    dropped); the batch processor's thread, or a flush under its export lock,
    calls `send` (exported, failed): each count has one writer at a time."""

    def __init__(self, exporter: Any, settings: Any, registry: Any) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from prometheus_client import Counter

        self.inner = exporter
        self.max_queue = settings.max_queue
        self.accepted = self.exported = self.failed = self.dropped = 0
        #: time.monotonic() when the running export began, or None.
        self.exporting_since: float | None = None
        self.last_failed = False
        self.closed = False
        spans = Counter("streamvisor_otel_spans", "Spans the otel plugin finished, by what became of them.", ["result"], registry=registry)
        self.metric = {result: spans.labels(result) for result in ("exported", "failed", "dropped")}
        self.batch = BatchSpanProcessor(
            _Exporter(self), max_queue_size=settings.max_queue, max_export_batch_size=min(settings.max_batch, settings.max_queue),
            schedule_delay_millis=settings.schedule_ms, export_timeout_millis=settings.export_timeout_ms,
        )

    # the span processor (what SpanMaker calls)

    def on_end(self, span: Any) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self.accepted - self.exported - self.failed >= self.max_queue:
            self.dropped += 1
            self.metric["dropped"].inc()
            return
        self.accepted += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)

    # what the batch processor's exporter does

    def send(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = SpanExportResult.FAILURE
        if not self.closed:
            self.exporting_since = time.monotonic()
            try:
                result = self.inner.export(spans)
            except Exception:
                result = SpanExportResult.FAILURE
            finally:
                self.exporting_since = None
        self.last_failed = result != SpanExportResult.SUCCESS
        if self.last_failed:
            self.failed += len(spans)
            self.metric["failed"].inc(len(spans))
        else:
            self.exported += len(spans)
            self.metric["exported"].inc(len(spans))
        return result

    def close(self) -> None:
        """Stop exporting: a retry under way gives up, later batches fail at once."""
        if not self.closed:
            self.closed = True
            self.inner.shutdown()

    # status

    def stalled(self) -> bool:
        """Whether the collector looks down: the last export failed, or the one
        under way has run for half a second (it is retrying)."""
        since = self.exporting_since
        return self.last_failed or (since is not None and time.monotonic() - since > 0.5)

    def counts(self) -> dict[str, int]:
        return {"exported": self.exported, "export_failures": self.failed, "dropped": self.dropped, "queued": self.accepted - self.exported - self.failed}


class _Exporter:
    """The exporter the batch processor calls, in its thread: `SpanExport.send`."""

    def __init__(self, owner: SpanExport) -> None:
        self.owner = owner

    def export(self, spans: Any) -> Any:
        return self.owner.send(spans)

    def shutdown(self) -> None:
        self.owner.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, default=str).decode()
