"""The `monitor` plugin: stream statistics, Prometheus metrics and one log line
per finished session.

It owns three things:

- **Per-chunk timing**, taken by a chunk transformer on the session's own task: a
  `perf_counter()`, a dict lookup and a few additions per chunk, into a small
  `_Tracking` record kept in a bounded dict keyed by session id. It never changes
  a delta and never raises into the stream.
- **The outcome**, read from the session's terminal event by an `on_event`
  listener (off the stream's task). The listener folds the session's tracking
  record and the event's timings and usage into a `SessionStats`, keeps it in a
  bounded LRU (for `GET /v1/monitor/sessions/<id>`), folds it into per-model
  aggregates (for `GET /v1/monitor/summary`) and into Prometheus metrics, and
  logs one line for it.
- **`GET /metrics`**: the runtime's own Prometheus registry (`runtime.metrics`),
  so the core's HTTP histogram and other plugins' metrics are served with the
  monitor's.

Every structure is bounded: tracked sessions (`max_tracked_sessions`), retained
finished sessions (`retained_sessions`), and the samples percentiles are computed
over (`summary_window` per model). A tracking record leaves with its session's
terminal event, which is never dropped.

Every event type that other plugins declare (`retry`, `fallback`, `cache_hit`,
...) is counted by type in `streamvisor_events_total`, without the monitor
knowing their names.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import time
from typing import Any, Iterator

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from quart import Response

from streamvisor.hooks import Delta, Event, Labelled, NotFound, Session, hookimpl, listens_to, log_context

log = logging.getLogger("streamvisor.monitor")

DEFAULT_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _buckets(_instance: Any, attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must list at least one bucket bound")
    if any(b <= 0 or math.isinf(b) for b in value) or any(a >= b for a, b in zip(value, value[1:])):
        raise ValueError(f"{attribute.name} must be finite positive bounds in increasing order, got {list(value)}")


@attrs.frozen
class Settings:
    #: Write one log line per finished session on the `streamvisor.monitor` logger.
    log_sessions: bool = True
    #: Live sessions whose chunk timing is tracked at once (the core's default
    #: max_live_sessions); a session past it is not timed, and counted in
    #: streamvisor_monitor_untracked_sessions_total.
    max_tracked_sessions: int = attrs.field(default=20_000, validator=attrs.validators.ge(1))
    #: Finished sessions whose stats GET /v1/monitor/sessions/<id> keeps (LRU).
    retained_sessions: int = attrs.field(default=1_000, validator=attrs.validators.ge(1))
    #: Recent finished sessions per model that the summary's percentiles cover.
    summary_window: int = attrs.field(default=1_000, validator=attrs.validators.ge(1))
    #: Histogram bucket bounds, in seconds.
    gap_buckets: tuple[float, ...] = attrs.field(default=DEFAULT_GAP_BUCKETS, validator=_buckets)
    ttft_buckets: tuple[float, ...] = attrs.field(default=DEFAULT_TTFT_BUCKETS, validator=_buckets)
    duration_buckets: tuple[float, ...] = attrs.field(default=DEFAULT_DURATION_BUCKETS, validator=_buckets)


@attrs.define(slots=True, eq=False)
class _Tracking:
    """One live session's chunk timing: its per-session chunk transformer."""

    #: The gap histogram's bucket bounds (shared by all sessions).
    bounds: tuple[float, ...]
    #: Gap counts per bucket (the last one is +Inf), folded into the aggregate
    #: histogram when the session ends: no Prometheus call per chunk.
    gap_counts: list[int]
    #: perf_counter() of the last output chunk (None before the first).
    last: float | None = None
    chunks: int = 0
    bytes: int = 0
    gap_sum: float = 0.0
    gap_max: float = 0.0

    def observe(self, delta: Delta) -> Delta:
        """The chunk transformer: time output chunks, return the delta unchanged."""
        content, reasoning = delta.content, delta.reasoning
        if not (content or reasoning or delta.tool_calls):
            return delta  # usage-only or finish-only: not an output chunk
        now = time.perf_counter()
        last = self.last
        if last is not None:
            gap = now - last
            self.gap_sum += gap
            if gap > self.gap_max:
                self.gap_max = gap
            # Chunks that came in one read are ~0 apart: the first bucket,
            # without a bisect.
            bounds = self.bounds
            self.gap_counts[0 if gap <= bounds[0] else bisect.bisect_left(bounds, gap)] += 1
        self.last = now
        self.chunks += 1
        if content:
            self.bytes += len(content) if content.isascii() else _utf8_len(content)
        if reasoning:
            self.bytes += _utf8_len(reasoning)
        return delta


@attrs.frozen
class SessionStats:
    """A finished session as the monitor saw it."""

    session_id: str
    request_id: str
    model: str
    provider: str
    outcome: str
    reason: str | None
    finish_reason: str | None
    error_type: str | None
    ttft_ms: float | None
    duration_ms: float | None
    chunks: int
    bytes: int
    gap_count: int
    gap_max_ms: float | None
    gap_mean_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    tokens_exact: bool
    tokens_per_second: float | None
    finished_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "monitor.session",
            "session_id": self.session_id,
            "request_id": self.request_id,
            "model": self.model,
            "provider": self.provider,
            "state": "finished",
            "outcome": self.outcome,
            "reason": self.reason,
            "finish_reason": self.finish_reason,
            "error_type": self.error_type,
            "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "gaps": {"count": self.gap_count, "max_ms": self.gap_max_ms, "mean_ms": self.gap_mean_ms},
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "reasoning": self.reasoning_tokens,
                "exact": self.tokens_exact,
            },
            "tokens_per_second": self.tokens_per_second,
            "finished_at": self.finished_at,
        }


@attrs.define(eq=False)
class _Aggregate:
    """Cumulative counts and a bounded window of samples, for one model (or all)."""

    provider: str
    window: int
    gap_counts: list[int]
    sessions: int = 0
    outcomes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    bytes: int = 0
    gap_sum: float = 0.0
    gap_count: int = 0
    gap_max: float = 0.0
    ttft: collections.deque[float] = attrs.field(init=False)
    tokens_per_second: collections.deque[float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.ttft = collections.deque(maxlen=self.window)
        self.tokens_per_second = collections.deque(maxlen=self.window)

    def add(self, stats: SessionStats, tracking: _Tracking | None) -> None:
        self.sessions += 1
        self.outcomes[stats.outcome] += 1
        self.prompt_tokens += stats.prompt_tokens
        self.completion_tokens += stats.completion_tokens
        self.chunks += stats.chunks
        self.bytes += stats.bytes
        if stats.ttft_ms is not None:
            self.ttft.append(stats.ttft_ms)
        if stats.tokens_per_second is not None:
            self.tokens_per_second.append(stats.tokens_per_second)
        if tracking is not None:
            self.gap_sum += tracking.gap_sum
            self.gap_count += stats.gap_count
            self.gap_max = max(self.gap_max, tracking.gap_max)
            for i, n in enumerate(tracking.gap_counts):
                self.gap_counts[i] += n

    def to_json(self, bounds: tuple[float, ...]) -> dict[str, Any]:
        ttft = sorted(self.ttft)
        rates = sorted(self.tokens_per_second)
        cumulative, histogram = 0, []
        for bound, n in zip((*bounds, math.inf), self.gap_counts):
            cumulative += n
            histogram.append({"le": "+Inf" if math.isinf(bound) else bound, "count": cumulative})
        return {
            "sessions": self.sessions,
            "by_outcome": dict(self.outcomes),
            "ttft_ms": {"p50": _percentile(ttft, 50), "p90": _percentile(ttft, 90), "p99": _percentile(ttft, 99), "samples": len(ttft)},
            "tokens_per_second": {"p50": _percentile(rates, 50), "samples": len(rates)},
            "gaps": {
                "count": self.gap_count,
                "mean_ms": _ms(self.gap_sum / self.gap_count) if self.gap_count else None,
                "max_ms": _ms(self.gap_max) if self.gap_count else None,
                "histogram_seconds": histogram,
            },
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "chunks": self.chunks,
            "bytes": self.bytes,
        }


def _percentile(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython's compact strings: most chunks skip the encode.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _GapHistogram:
    """A Prometheus collector for the inter-chunk gap histogram, read from the
    monitor's aggregates at scrape time (sessions fold their gaps in once, when
    they end, instead of one `observe()` per chunk)."""

    NAME = "streamvisor_stream_chunk_gap_seconds"

    def __init__(self, plugin: "MonitorPlugin") -> None:
        self.plugin = plugin

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.NAME, "Time between consecutive output chunks of a stream.", labels=["model", "provider"])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.NAME, "Time between consecutive output chunks of a stream.", labels=["model", "provider"])
        bounds = self.plugin.settings.gap_buckets
        for model, aggregate in sorted(self.plugin.by_model.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*bounds, math.inf), aggregate.gap_counts):
                cumulative += n
                buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), cumulative))
            family.add_metric([model, aggregate.provider], buckets, aggregate.gap_sum)
        yield family


class _ListenerStatsCollector:
    """Per-plugin event listener counts, read from `runtime.events.stats` at scrape time."""

    FAMILIES = (
        ("streamvisor_event_listener_delivered", "Events delivered to a plugin's on_event listener.", "delivered"),
        ("streamvisor_event_listener_errors", "Events on which a plugin's on_event listener raised.", "errors"),
        ("streamvisor_event_listener_dropped", "Events dropped because a plugin's listener queue was full.", "dropped"),
        ("streamvisor_event_listener_timeouts", "Listener calls cancelled for taking longer than listener_timeout_seconds.", "timeouts"),
    )

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, doc, _ in self.FAMILIES:
            yield CounterMetricFamily(name, doc, labels=["plugin"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.runtime.events.stats
        for name, doc, field in self.FAMILIES:
            family = CounterMetricFamily(name, doc, labels=["plugin"])
            for listener in stats:
                family.add_metric([listener.plugin], getattr(listener, field))
            yield family


@attrs.define(eq=False)
class _Metrics:
    """The monitor's metrics in `runtime.metrics`."""

    # Labelled: each call gives the child metric of those label values.
    sessions: Labelled
    duration: Labelled
    ttft: Labelled
    tokens: Labelled
    chunks: Labelled
    bytes: Labelled
    errors: Labelled
    events: Labelled
    untracked: Counter

    @classmethod
    def create(cls, runtime: Any, settings: Settings, plugin: "MonitorPlugin") -> "_Metrics":
        registry = runtime.metrics
        labels = ["model", "provider"]
        active = Gauge("streamvisor_sessions_active", "Sessions that have not finished yet.", registry=registry)
        active.set_function(lambda: runtime.sessions.live_count)
        registry.register(_GapHistogram(plugin))
        registry.register(_ListenerStatsCollector(runtime))
        return cls(
            sessions=Labelled(Counter("streamvisor_sessions", "Finished sessions by outcome.", [*labels, "outcome"], registry=registry)),
            duration=Labelled(Histogram(
                "streamvisor_stream_duration_seconds",
                "A session's duration, from its creation to its end.",
                [*labels, "outcome"],
                registry=registry,
                buckets=settings.duration_buckets,
            )),
            ttft=Labelled(Histogram(
                "streamvisor_stream_time_to_first_token_seconds",
                "Time from a session's creation to its first chunk.",
                labels,
                registry=registry,
                buckets=settings.ttft_buckets,
            )),
            tokens=Labelled(Counter(
                "streamvisor_stream_tokens",
                "Tokens of finished sessions: type=input (prompt) or output (completion).",
                [*labels, "type"],
                registry=registry,
            )),
            chunks=Labelled(Counter("streamvisor_stream_chunks", "Output chunks (content, reasoning or tool calls) streamed.", labels, registry=registry)),
            bytes=Labelled(Counter("streamvisor_stream_output_bytes", "UTF-8 bytes of content and reasoning streamed.", labels, registry=registry)),
            errors=Labelled(Counter("streamvisor_stream_errors", "Failed sessions by error type.", [*labels, "error_type"], registry=registry)),
            events=Labelled(Counter(
                "streamvisor_events",
                "Session events of the types plugins declare (retry, fallback, cache_hit, ...), by type.",
                ["type", *labels],
                registry=registry,
            )),
            untracked=Counter(
                "streamvisor_monitor_untracked_sessions",
                "Sessions that streamed output but were not timed (max_tracked_sessions was reached).",
                registry=registry,
            ),
        )


# -- the routes' OpenAPI operations ---------------------------------------------------

_NULLABLE_MS = {"type": ["number", "null"]}

_AGGREGATE = {
    "type": "object",
    "properties": {
        "sessions": {"type": "integer"},
        "by_outcome": {"type": "object", "additionalProperties": {"type": "integer"}},
        "ttft_ms": {"type": "object", "properties": {"p50": _NULLABLE_MS, "p90": _NULLABLE_MS, "p99": _NULLABLE_MS, "samples": {"type": "integer"}}},
        "tokens_per_second": {"type": "object", "properties": {"p50": _NULLABLE_MS, "samples": {"type": "integer"}}},
        "gaps": {
            "type": "object",
            "properties": {
                "count": {"type": "integer"},
                "mean_ms": _NULLABLE_MS,
                "max_ms": _NULLABLE_MS,
                "histogram_seconds": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"le": {"type": ["number", "string"]}, "count": {"type": "integer"}}},
                },
            },
        },
        "tokens": {"type": "object", "properties": {"prompt": {"type": "integer"}, "completion": {"type": "integer"}}},
        "chunks": {"type": "integer"},
        "bytes": {"type": "integer"},
    },
}

METRICS_OPENAPI = {
    "summary": "Prometheus metrics",
    "description": "The runtime's Prometheus registry in the text exposition format: the core's HTTP histogram, the monitor's stream metrics and every other plugin's.",
    "responses": {"200": {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
}

SUMMARY_OPENAPI = {
    "summary": "Stream statistics, overall and by model",
    "description": "Counts since start-up, and percentiles over the last `summary_window` finished sessions of each model.",
    "responses": {
        "200": {
            "description": "The summary.",
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [_AGGREGATE],
                        "required": ["object", "live"],
                        "properties": {
                            "object": {"const": "monitor.summary"},
                            "live": {"type": "integer"},
                            "by_model": {"type": "object", "additionalProperties": _AGGREGATE},
                            "window": {"type": "integer"},
                            "tracked": {"type": "integer"},
                            "untracked": {"type": "integer"},
                        },
                    }
                }
            },
        }
    },
}

SESSION_OPENAPI = {
    "summary": "One session's stream statistics",
    "description": "A live session's statistics so far, or a finished one's while the monitor retains it (`retained_sessions`).",
    "parameters": [
        {
            "name": "session_id",
            "in": "path",
            "required": True,
            "description": "A session id (the X-Session-ID header of a chat completion).",
            "schema": {"type": "string", "pattern": "^[^/]+$"},
        }
    ],
    "responses": {
        "200": {
            "description": "The session's statistics.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "session_id", "state"],
                        "properties": {
                            "object": {"const": "monitor.session"},
                            "session_id": {"type": "string"},
                            "request_id": {"type": "string"},
                            "model": {"type": "string"},
                            "provider": {"type": "string"},
                            "state": {"type": "string"},
                            "outcome": {"type": ["string", "null"]},
                            "ttft_ms": _NULLABLE_MS,
                            "duration_ms": _NULLABLE_MS,
                            "chunks": {"type": "integer"},
                            "bytes": {"type": "integer"},
                            "gaps": {"type": "object"},
                            "tokens": {"type": "object"},
                        },
                    }
                }
            },
        },
        "404": {
            "description": "Unknown, finished but not yet recorded, or no longer retained.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    },
}


class MonitorPlugin:
    Settings = Settings
    streamvisor_contract = "1.0"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Live sessions' chunk timing by session id; each leaves with its
        #: session's terminal event (never dropped).
        self.tracked: dict[str, _Tracking] = {}
        #: Finished sessions' stats, least recently used first.
        self.finished: collections.OrderedDict[str, SessionStats] = collections.OrderedDict()
        self.by_model: dict[str, _Aggregate] = {}
        self.overall = self._aggregate("*")
        self.untracked = 0
        self._gap_bounds = settings.gap_buckets

    def _aggregate(self, provider: str) -> _Aggregate:
        return _Aggregate(provider, self.settings.summary_window, [0] * (len(self.settings.gap_buckets) + 1))

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    def register_chunk_transformers(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        self.metrics = _Metrics.create(runtime, self.settings, self)
        register(self.tracker)

    @hookimpl
    def register_routes(self, register: Any) -> None:
        register("/metrics", self.metrics_view, openapi=METRICS_OPENAPI)
        register("/v1/monitor/summary", self.summary_view, openapi=SUMMARY_OPENAPI)
        register("/v1/monitor/sessions/<session_id>", self.session_view, openapi=SESSION_OPENAPI)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("summary", self.summary)

    @hookimpl
    # Everything but the per-session life cycle (counted by the terminal events)
    # and the per-chunk events: the types other plugins declare, unnamed here.
    @listens_to(exclude=("created", "started", "first_token", "chunk"))
    def on_event(self, event: Event) -> None:
        if event.outcome is not None:
            self._finish(event)
        else:
            self.metrics.events(event.type, event.model, event.provider).inc()

    # -- the hot path ------------------------------------------------------------

    def tracker(self, session: Session) -> Any:
        """A session starts: its own `_Tracking`, whose `observe` is its transformer."""
        tracked = self.tracked
        if len(tracked) >= self.settings.max_tracked_sessions:
            return None  # past the bound this session goes untimed (and counted when it ends)
        tracking = tracked[session.id] = _Tracking(self._gap_bounds, [0] * (len(self._gap_bounds) + 1))
        return tracking.observe

    # -- a session ends ----------------------------------------------------------

    def _finish(self, event: Event) -> None:
        tracking = self.tracked.pop(event.session_id, None)
        stats = self._stats(event, tracking)
        self.finished[stats.session_id] = stats
        while len(self.finished) > self.settings.retained_sessions:
            self.finished.popitem(last=False)
        aggregate = self.by_model.get(stats.model)
        if aggregate is None:
            aggregate = self.by_model[stats.model] = self._aggregate(stats.provider)
        aggregate.provider = stats.provider
        aggregate.add(stats, tracking)
        self.overall.add(stats, tracking)
        if tracking is None and stats.ttft_ms is not None and stats.completion_tokens > 0:
            # It streamed output, but was not timed (past max_tracked_sessions).
            self.untracked += 1
            self.metrics.untracked.inc()
        self._record_metrics(stats)
        if self.settings.log_sessions and log.isEnabledFor(logging.INFO):
            self._log(stats)

    def _stats(self, event: Event, tracking: _Tracking | None) -> SessionStats:
        outcome = event.outcome
        assert outcome is not None
        usage = outcome.usage
        completion = usage.completion_tokens
        ttft_ms = outcome.first_token_ms
        duration_ms = outcome.duration_ms
        rate = None
        if ttft_ms is not None and duration_ms is not None and completion > 0 and duration_ms > ttft_ms:
            rate = round(completion / ((duration_ms - ttft_ms) / 1000), 3)
        gaps = tracking.chunks - 1 if tracking is not None and tracking.chunks > 1 else 0
        return SessionStats(
            session_id=event.session_id,
            request_id=event.request_id,
            model=event.model,
            provider=event.provider,
            outcome=event.type,
            reason=outcome.reason,
            finish_reason=outcome.finish_reason,
            error_type=(outcome.error_code or "unknown") if event.type == "failed" else None,
            ttft_ms=ttft_ms,
            duration_ms=duration_ms,
            chunks=tracking.chunks if tracking is not None else 0,
            bytes=tracking.bytes if tracking is not None else 0,
            gap_count=gaps,
            gap_max_ms=_ms(tracking.gap_max) if gaps else None,
            gap_mean_ms=_ms(tracking.gap_sum / gaps) if gaps else None,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=completion,
            reasoning_tokens=usage.reasoning_tokens,
            tokens_exact=usage.exact,
            tokens_per_second=rate,
            finished_at=event.at,
        )

    def _record_metrics(self, stats: SessionStats) -> None:
        metrics = self.metrics
        model, provider = stats.model, stats.provider
        metrics.sessions(model, provider, stats.outcome).inc()
        if stats.duration_ms is not None:
            metrics.duration(model, provider, stats.outcome).observe(stats.duration_ms / 1000)
        if stats.ttft_ms is not None:
            metrics.ttft(model, provider).observe(stats.ttft_ms / 1000)
        metrics.tokens(model, provider, "input").inc(stats.prompt_tokens)
        metrics.tokens(model, provider, "output").inc(stats.completion_tokens)
        metrics.chunks(model, provider).inc(stats.chunks)
        metrics.bytes(model, provider).inc(stats.bytes)
        if stats.error_type is not None:
            metrics.errors(model, provider, stats.error_type).inc()

    def _log(self, stats: SessionStats) -> None:
        # The listener runs on its own task, whose context carries no request.
        with log_context(stats.request_id, stats.session_id):
            log.info(
                "session %s: model=%s provider=%s ttft=%s duration=%s chunks=%d tokens=%d+%d tok/s=%s%s",
                stats.outcome,
                stats.model,
                stats.provider,
                _shown_ms(stats.ttft_ms),
                _shown_ms(stats.duration_ms),
                stats.chunks,
                stats.prompt_tokens,
                stats.completion_tokens,
                "-" if stats.tokens_per_second is None else f"{stats.tokens_per_second:.1f}",
                f" error_type={stats.error_type}" if stats.error_type else "",
            )

    # -- views -------------------------------------------------------------------

    async def metrics_view(self) -> Response:
        return Response(generate_latest(self.runtime.metrics), content_type=CONTENT_TYPE_LATEST)

    async def session_view(self, session_id: str) -> dict[str, Any]:
        stats = self.finished.get(session_id)
        if stats is not None:
            self.finished.move_to_end(session_id)
            return stats.to_json()
        tracking = self.tracked.get(session_id)
        session = self.runtime.sessions.find(session_id)
        if session is None or session.finished:
            # Finished sessions are answered from the LRU above once their terminal
            # event was handled; until then (a few ms), or once it left the LRU: unknown.
            raise NotFound(f"No monitor stats for session '{session_id}' (unknown, not finished yet, or no longer retained).")
        return self._live_json(session, tracking)

    def _live_json(self, session: Any, tracking: _Tracking | None) -> dict[str, Any]:
        timings = session.timings()
        usage = session.usage
        gaps = tracking.chunks - 1 if tracking is not None and tracking.chunks > 1 else 0
        return {
            "object": "monitor.session",
            "session_id": session.id,
            "request_id": session.request_id,
            "model": session.model,
            "provider": session.provider,
            "state": session.state,
            "outcome": None,
            "ttft_ms": timings["first_token_ms"],
            "duration_ms": timings["duration_ms"],
            "chunks": tracking.chunks if tracking is not None else 0,
            "bytes": tracking.bytes if tracking is not None else 0,
            "gaps": {
                "count": gaps,
                "max_ms": _ms(tracking.gap_max) if gaps else None,
                "mean_ms": _ms(tracking.gap_sum / gaps) if gaps else None,
            },
            "tokens": {
                "prompt": usage.prompt_tokens if usage else 0,
                "completion": usage.completion_tokens if usage else 0,
                "reasoning": usage.reasoning_tokens if usage else 0,
                "exact": usage.exact if usage else False,
            },
        }

    async def summary_view(self) -> dict[str, Any]:
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The body of GET /v1/monitor/summary; also this plugin's status panel."""
        bounds = self.settings.gap_buckets
        body = {"object": "monitor.summary", "live": self.runtime.sessions.live_count}
        body.update(self.overall.to_json(bounds))
        body["by_model"] = {
            model: {"provider": aggregate.provider, **aggregate.to_json(bounds)}
            for model, aggregate in sorted(self.by_model.items())
        }
        body["window"] = self.settings.summary_window
        body["tracked"] = len(self.tracked)
        body["untracked"] = self.untracked
        return body


def _shown_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}ms"
