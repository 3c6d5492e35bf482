"""The otel plugin: the span tree and GenAI attributes of a stream, a retry, a
fallback, a stop, a cache hit and a miss (the SDK's in-memory exporter), the
client's traceparent continued and passed upstream, the trace and span ids in
the log lines, real exports over OTLP/HTTP and gRPC to receivers on loopback
that decode them with opentelemetry-proto, and what happens when the collector
is down or slow: streams do not wait, spans are dropped and counted."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import logging
import re
import socket
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from streamvisor.core.logs import CONSOLE_FORMAT, JSONLinesFormatter
from streamvisor.hooks import ConfigError, unwrap
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

[[plugins.scripted.models]]
name = "flaky-too"
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
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                collector.receive(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in resource_spans.resource.attributes})
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)

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


# -- trace ids in the logs -------------------------------------------------------------


def test_log_lines_of_a_session_carry_its_trace_and_span_ids(traced, caplog):
    server, plugin = traced
    with caplog.at_level(logging.INFO):
        server.http().get("/v1/models")
        with server.http() as http, http.stream(
            "POST", "/v1/chat/completions", json={"model": "flaky-too", "messages": [{"role": "user", "content": "logs"}], "stream": True}
        ) as response:
            session_id = response.headers["x-session-id"]
            assert "[DONE]" in response.read().decode()
    spans = spans_of(plugin, session_id, 4)
    (session,) = by_kind(spans, "INTERNAL")
    trace_id, span_id = format(session.context.trace_id, "032x"), format(session.context.span_id, "016x")
    console, jsonl = logging.Formatter(CONSOLE_FORMAT), JSONLinesFormatter()
    mine = [r for r in caplog.records if r.session_id == session_id]
    # The retry plugin logs from the session's actor, the access line from the request's handler.
    assert {r.name for r in mine} >= {"streamvisor.plugins.retry", "streamvisor.http"}, [(r.name, r.getMessage()) for r in mine]
    for record in mine:
        assert f"session_id={session_id} trace_id={trace_id} span_id={span_id} " in console.format(record)
        line = json.loads(jsonl.format(record))
        assert (line["session_id"], line["trace_id"], line["span_id"]) == (session_id, trace_id, span_id)
    # A line of no session is the line it always was.
    (models,) = [r for r in caplog.records if "GET /v1/models" in r.getMessage()]
    assert "trace_id" not in json.loads(jsonl.format(models))
    assert re.search(r" request_id=\w+ session_id=- GET /v1/models -> 200 ", console.format(models))


# -- the response cache ----------------------------------------------------------------


def test_a_cache_miss_has_its_lookup_span_before_the_upstream_call(traced):
    server, plugin = traced
    body = {"model": "fox", "messages": [{"role": "user", "content": "a question never asked"}], "temperature": 0}
    response = server.http().post("/v1/chat/completions", json=body)
    assert response.headers["x-cache"] == "miss"
    spans = spans_of(plugin, response.headers["x-session-id"], 4)
    (lookup,) = [s for s in spans if s.name == "cache lookup"]
    (session,), (attempt,) = [s for s in by_kind(spans, "INTERNAL") if s is not lookup], by_kind(spans, "CLIENT")
    assert lookup.attributes["streamvisor.cache.hit"] is False and lookup.attributes["streamvisor.cache.key"] == response.headers["x-cache-key"]
    assert lookup.parent.span_id == session.context.span_id
    assert session.start_time <= lookup.start_time <= lookup.end_time <= attempt.start_time
    assert session.attributes["streamvisor.cache.result"] == "miss"
    bypassed = server.http().post("/v1/chat/completions", json={**body, "temperature": 0.9})
    assert bypassed.headers["x-cache"] == "bypass"
    spans = spans_of(plugin, bypassed.headers["x-session-id"], 3)
    assert [s for s in spans if s.name == "cache lookup"] == [] and by_kind(spans, "INTERNAL")[0].attributes["streamvisor.cache.result"] == "bypass"


# -- export: a collector down, a full queue, gRPC ------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_many(server: ServerThread, count: int) -> list[str]:
    """`count` streamed requests at once; the text of each."""

    def one(_: int) -> str:
        with server.http() as http:
            response = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "stream": True})
            assert response.status_code == 200
            return response.text

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def otel_metrics(server: ServerThread) -> dict[str, float]:
    text = server.http().get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^streamvisor_otel_spans_total\{result="(\w+)"\} (\S+)$', text, re.M)}


def test_with_the_collector_down_streams_do_not_wait_and_spans_are_dropped_and_counted():
    text = f"""
[plugins.otel]
endpoint = "http://127.0.0.1:{closed_port()}/v1/traces"
schedule_ms = 20
max_queue = 8
max_batch = 4
[plugins.monitor]
[plugins.health]
{SCRIPTED}
"""
    server = ServerThread(make_config(text)).start()
    try:
        t0 = time.monotonic()
        bodies = stream_many(server, 20)
        elapsed = time.monotonic() - t0
        # Its first export retries against the dead port for most of
        # export_timeout_ms (10 s): a stream that waited for it would take that long.
        assert all(body.rstrip().endswith("data: [DONE]") for body in bodies) and elapsed < 5, elapsed
        deadline = time.monotonic() + 5
        while otel_metrics(server).get("dropped", 0) == 0:
            assert time.monotonic() < deadline, otel_metrics(server)
            time.sleep(0.05)
        assert otel_metrics(server)["exported"] == 0
        ready = server.http().get("/health/ready").json()
        (check,) = [c for c in ready["checks"] if c["name"] == "otel:exporter"]
        assert ready["status"] == "ready" and check["ok"] and re.search(r"0 spans exported, \d+ failed, [1-9]\d* dropped", check["detail"]), check
        t0 = time.monotonic()
    finally:
        server.stop()
    assert time.monotonic() - t0 < 1.5  # the export still retrying gives up at shutdown: no 2 s flush


class SlowCollector(Collector):
    """A receiver that holds every export until `release()`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        super().__init__()

    def receive(self, body: bytes) -> None:
        self.gate.wait(10)
        super().receive(body)

    def release(self) -> None:
        self.gate.set()


def test_the_export_queue_is_bounded_and_what_does_not_fit_is_dropped_and_counted():
    collector = SlowCollector()
    text = f"""
[plugins.otel]
endpoint = "{collector.url}"
schedule_ms = 20
max_queue = 4
max_batch = 4
[plugins.monitor]
{SCRIPTED}
"""
    server = ServerThread(make_config(text)).start()
    try:
        stream_many(server, 10)  # 30 spans: a server, a session and an attempt span each
        deadline = time.monotonic() + 5
        while sum(otel_metrics(server).values()) + 4 < 30:
            assert time.monotonic() < deadline, otel_metrics(server)
            time.sleep(0.05)
        # Four spans are held by the collector; the other 26 found the queue full.
        assert otel_metrics(server) == {"exported": 0, "failed": 0, "dropped": 26}
        collector.release()
        while otel_metrics(server)["exported"] < 4:
            assert time.monotonic() < deadline, otel_metrics(server)
            time.sleep(0.05)
        assert len(collector.spans) == 4
    finally:
        collector.release()
        server.stop()
        collector.close()


def test_spans_are_exported_over_otlp_grpc():
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            for resource_spans in request.resource_spans:
                for scope in resource_spans.scope_spans:
                    received.extend(scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    receiver = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    text = f"""
[plugins.otel]
exporter = "otlp_grpc"
endpoint = "http://127.0.0.1:{port}"
schedule_ms = 50
{SCRIPTED}
"""
    server = ServerThread(make_config(text)).start()
    try:
        trace_id = "5b8efff798038103d269b633813fc60c"
        response = server.http().post(
            "/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}]},
            headers={"traceparent": f"00-{trace_id}-eee19b7ec3c1b174-01"},
        )
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while len(received) < 3:
            assert time.monotonic() < deadline, len(received)
            time.sleep(0.05)
    finally:
        server.stop()
        receiver.stop(None)
    assert {s.trace_id.hex() for s in received} == {trace_id}
    assert sorted(s.name for s in received) == ["POST /v1/chat/completions", "chat fox", "chat fox"]


def test_the_grpc_exporter_missing_is_a_configuration_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(RuntimeError) as caught:
        ServerThread(make_config('[plugins.otel]\nexporter = "otlp_grpc"\n' + SCRIPTED)).start()
    error = unwrap(caught.value.__cause__)
    assert isinstance(error, ConfigError), error
    assert "plugins.otel.exporter" in str(error) and "pip install 'streamvisor[otel-grpc]'" in str(error), str(error)


def test_the_otlp_encoding_is_the_sdks_to_the_byte_after_decoding(traced):
    """plugins/otel/otlp.py writes OTLP itself (four times faster than the
    SDK's encoder): what it writes must decode to what the SDK's would."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from streamvisor.plugins.otel.otlp import encode_request, http_exporter

    server, plugin = traced
    continued = server.http().post(
        "/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "é ✓"}], "stop": ["\n", "."], "seed": 7},
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "congo=t61rcWkgMzE"},
    )
    fallen_back = server.http().post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    spans = spans_of(plugin, continued.headers["x-session-id"], 3) + spans_of(plugin, fallen_back.headers["x-session-id"], 3)
    kinds = {s.kind.name for s in spans} | {s.status.status_code.name for s in spans}
    assert {"SERVER", "INTERNAL", "CLIENT", "ERROR", "UNSET"} <= kinds and any(s.events and s.events[0].attributes for s in spans)
    ours = ExportTraceServiceRequest.FromString(encode_request(spans))
    sdks = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializePartialToString())
    assert ours == sdks
    # The fast path needs the SDK exporter's transport as 1.45 lays it out; on
    # another layout it falls back to the SDK's encoder (correct, slower).
    exporter = http_exporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert callable(getattr(getattr(exporter, "_client", None), "export", None)), "the installed SDK exporter has no _client: spans are encoded by the SDK"
    exporter.shutdown()


def test_sampling_keeps_the_ratio_of_new_traces_and_follows_the_clients_flag():
    server = ServerThread(make_config('[plugins.otel]\nexporter = "memory"\nsampling_ratio = 0.0\n' + SCRIPTED)).start()
    try:
        plugin = next(p.plugin for p in server.runtime._host if p.name == "otel")
        body = {"model": "fox", "messages": [{"role": "user", "content": "x"}]}
        for flags in ("00", None):  # the client's "not sampled", then no client trace: the ratio, 0
            headers = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-{flags}"} if flags else {}
            assert server.http().post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        sampled = server.http().post("/v1/chat/completions", json=body, headers={"traceparent": f"00-{'ef' * 16}-{'cd' * 8}-01"})
        spans = spans_of(plugin, sampled.headers["x-session-id"], 3)
    finally:
        server.stop()
    assert {format(s.context.trace_id, "032x") for s in plugin.memory.get_finished_spans()} == {"ef" * 16} and len(spans) == 3


def test_a_hedged_first_token_shows_both_attempts_and_the_loser_cancelled():
    from streamvisor.testing import Reply, completion_events

    with FakeUpstream(models=["m1"]) as slow, FakeUpstream(models=["m1"]) as quick:
        slow.reply(Reply(chunks=completion_events("too late"), delay=3.0))
        quick.reply(Reply(chunks=completion_events("in time")))
        text = "[plugins.openai]\n" + "".join(
            f'[[plugins.openai.upstreams]]\nname = "{name}"\nbase_url = "{fake.url}"\nmodels = ["m1"]\nread_timeout = 10\n'
            for name, fake in (("slow", slow), ("quick", quick))
        ) + (
            '[plugins.router]\nseed = 1\n[plugins.router.models.smart]\nstrategy = "weighted"\nhedge_after_ms = 100\n'
            'deployments = [{ provider = "slow", model = "m1", weight = 1 }, { provider = "quick", model = "m1", weight = 0 }]\n'
            '[plugins.retry]\n[plugins.otel]\nexporter = "memory"\n'
        )
        server = ServerThread(make_config(text)).start()
        try:
            plugin = next(p.plugin for p in server.runtime._host if p.name == "otel")
            response = server.http().post("/v1/chat/completions", json={"model": "smart", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 200 and "in time" in response.text
            spans = spans_of(plugin, response.headers["x-session-id"], 4)
        finally:
            server.stop()
    attempts = {s.attributes["gen_ai.provider.name"]: s for s in by_kind(spans, "CLIENT")}
    assert set(attempts) == {"slow", "quick"}
    assert "cancelled" in [e.name for e in attempts["slow"].events] and "gen_ai.first_token" in [e.name for e in attempts["quick"].events]
    (session,) = by_kind(spans, "INTERNAL")
    assert "router.hedge" in [e.name for e in session.events], [e.name for e in session.events]
