"""The otel plugin: the span tree and GenAI attributes of a stream, a retry, a
fallback, a stop and a cache hit (the SDK's in-memory exporter), the client's
traceparent continued and passed upstream, and a real export over OTLP/HTTP to
a receiver on loopback that decodes it with opentelemetry-proto."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

import httpx
import pytest

from streamvisor.testing import FakeUpstream

from .conftest import SCRIPTED, ServerThread, make_config

STACK = """
[plugins.cache]
backend = "memory"
[plugins.retry]
backoff_initial = 0.01
[plugins.retry.fallbacks]
broken = ["fox"]
[plugins.otel]
exporter = "memory"
"""

FLAKY = """
[[plugins.scripted.models]]
name = "flaky"
text = "second time lucky"
fail_first = 1
error_status = 502
"""


@pytest.fixture(scope="module")
def traced() -> Any:
    server = ServerThread(make_config(STACK + SCRIPTED + FLAKY)).start()
    plugin = next(p.plugin for p in server.runtime._host if p.name == "otel")
    try:
        yield server, plugin
    finally:
        server.stop()


def spans_of(plugin: Any, session_id: str, count: int, timeout: float = 5.0) -> list[Any]:
    """The finished spans of one session's trace (found through its session span)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = plugin.memory.get_finished_spans()
        mine = [s for s in spans if s.attributes.get("streamvisor.session_id") == session_id]
        if mine:
            trace_id = mine[0].context.trace_id
            tree = [s for s in spans if s.context.trace_id == trace_id]
            if len(tree) >= count:
                return tree
        assert time.monotonic() < deadline, [s.name for s in spans]
        time.sleep(0.02)


def by_kind(spans: list[Any], kind: str) -> list[Any]:
    return [s for s in spans if s.kind.name == kind]


def test_a_streamed_request_is_a_server_span_a_session_span_and_an_attempt(traced):
    server, plugin = traced
    response = server.http().post(
        "/v1/chat/completions",
        json={"model": "fox", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 50, "temperature": 0.3},
    )
    session_id = response.headers["x-session-id"]
    spans = spans_of(plugin, session_id, 3)
    (root,), (session,), (attempt,) = by_kind(spans, "SERVER"), by_kind(spans, "INTERNAL"), by_kind(spans, "CLIENT")
    assert root.parent is None and session.parent.span_id == root.context.span_id and attempt.parent.span_id == session.context.span_id
    a = session.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "fox" and a["gen_ai.provider.name"] == "scripted"
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.3
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",) and a["gen_ai.response.model"] == "fox"
    assert a["streamvisor.time_to_first_token_ms"] >= 0 and a["streamvisor.attempts"] == 1
    assert "gen_ai.input.messages" not in a  # no content unless capture_content
    assert [e.name for e in session.events] == ["gen_ai.first_token"]
    assert attempt.attributes["gen_ai.provider.name"] == "scripted" and [e.name for e in attempt.events] == ["gen_ai.first_token"]
    assert root.start_time <= session.start_time <= attempt.start_time and attempt.end_time <= session.end_time <= root.end_time


def test_a_retried_request_has_an_attempt_span_per_try(traced):
    server, plugin = traced
    response = server.http().post("/v1/chat/completions", json={"model": "flaky", "messages": [{"role": "user", "content": "try"}]})
    assert response.status_code == 200
    spans = spans_of(plugin, response.headers["x-session-id"], 4)
    attempts = sorted(by_kind(spans, "CLIENT"), key=lambda s: s.attributes["streamvisor.attempt"])
    assert [s.status.status_code.name for s in attempts] == ["ERROR", "UNSET"]
    assert attempts[0].attributes["error.type"] == "upstream_error"
    (session,) = by_kind(spans, "INTERNAL")
    retry = [e for e in session.events if e.name == "retry"]
    assert retry and retry[0].attributes["reason"] == "server_error" and retry[0].attributes["status"] == 502


def test_a_fallback_shows_the_model_it_moved_to(traced):
    server, plugin = traced
    response = server.http().post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    spans = spans_of(plugin, response.headers["x-session-id"], 3)
    models = [s.attributes["gen_ai.request.model"] for s in sorted(by_kind(spans, "CLIENT"), key=lambda s: s.attributes["streamvisor.attempt"])]
    assert models[0] == "broken" and models[-1] == "fox"
    (session,) = by_kind(spans, "INTERNAL")
    fallback = [e for e in session.events if e.name == "fallback"]
    assert fallback and fallback[0].attributes["from_model"] == "broken" and fallback[0].attributes["to_model"] == "fox"


def test_a_stopped_stream_has_a_stop_event(traced):
    server, plugin = traced
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}) as response:
        session_id = response.headers["x-session-id"]
        time.sleep(0.2)
        assert httpx.post(f"{server.url}/v1/sessions/{session_id}/stop").status_code == 200
        response.read()
    spans = spans_of(plugin, session_id, 3)
    (session,) = by_kind(spans, "INTERNAL")
    assert "stopped" in [e.name for e in session.events] and session.attributes["streamvisor.state"] == "stopped"
    (attempt,) = by_kind(spans, "CLIENT")
    assert "cancelled" in [e.name for e in attempt.events] or "closed" in [e.name for e in attempt.events]


def test_a_cache_hit_has_its_span(traced):
    server, plugin = traced
    body = {"model": "fox", "messages": [{"role": "user", "content": "same question"}], "temperature": 0}
    server.http().post("/v1/chat/completions", json=body)
    second = server.http().post("/v1/chat/completions", json=body)
    assert second.headers["x-cache"] == "hit"
    spans = spans_of(plugin, second.headers["x-session-id"], 3)
    hits = [s for s in spans if s.name == "cache lookup"]
    assert len(hits) == 1 and hits[0].attributes["streamvisor.cache.hit"] is True
    assert by_kind(spans, "CLIENT") == []  # the provider was not called


def test_the_clients_traceparent_is_continued_and_sent_upstream():
    fake = FakeUpstream()
    fake.respond(200, b'data: {"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n', {"Content-Type": "text/event-stream"})
    text = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "up"
base_url = "{fake.url}"
[plugins.otel]
exporter = "memory"
"""
    server = ServerThread(make_config(text)).start()
    try:
        plugin = next(p.plugin for p in server.runtime._host if p.name == "otel")
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        response = server.http().post(
            "/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
            headers={"traceparent": f"00-{trace_id}-{parent}-01", "tracestate": "vendor=1"},
        )
        assert response.status_code == 200
        spans = spans_of(plugin, response.headers["x-session-id"], 3)
    finally:
        server.stop()
        fake.close()
    (root,) = by_kind(spans, "SERVER")
    (attempt,) = by_kind(spans, "CLIENT")
    assert format(root.context.trace_id, "032x") == trace_id and format(root.parent.span_id, "016x") == parent
    sent = fake.seen_headers[-1]["traceparent"]
    assert sent == f"00-{trace_id}-{attempt.context.span_id:016x}-01"


class Collector:
    """A minimal OTLP/HTTP receiver: POST /v1/traces, protobuf bodies decoded
    with opentelemetry-proto."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    collector.resources.append({a.key: a.value.string_value for a in resource_spans.resource.attributes})
                    for scope in resource_spans.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_spans_are_exported_over_otlp_http_and_continue_the_clients_trace():
    collector = Collector()
    text = f"""
[plugins.otel]
endpoint = "{collector.url}"
service_name = "gateway-under-test"
schedule_ms = 100
[plugins.otel.resource_attributes]
"deployment.environment" = "test"
{SCRIPTED}
"""
    server = ServerThread(make_config(text)).start()
    try:
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        server.http().post(
            "/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        )
        deadline = time.monotonic() + 10
        while len(collector.spans) < 3:
            assert time.monotonic() < deadline, len(collector.spans)
            time.sleep(0.05)
    finally:
        server.stop()
        collector.close()
    assert {s.trace_id.hex() for s in collector.spans} == {trace_id}
    assert sorted(s.name for s in collector.spans) == ["POST /v1/chat/completions", "chat fox", "chat fox"]
    assert collector.resources[0]["service.name"] == "gateway-under-test" and collector.resources[0]["deployment.environment"] == "test"
