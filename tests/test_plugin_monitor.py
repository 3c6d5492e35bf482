"""The monitor plugin against real servers: /metrics counts what happened, the
per-session and summary routes describe the streams, the log line carries the
request's id, every structure is bounded, and the stream itself never changes."""

from __future__ import annotations

import json
import logging
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamvisor.config import ConfigError
from streamvisor.hooks import PluginHost, hookimpl

from .conftest import SCRIPTED, make_config, start_server

MORE_MODELS = """
[[plugins.scripted.models]]
name = "paced"
text = "one two three four five six"
delay = 0.05

[[plugins.scripted.models]]
name = "thinker"
reasoning = "hmm, let me think"
text = "Grüße aus Köln ☕"
"""
MONITORED = SCRIPTED + MORE_MODELS + "\n[plugins.monitor]\n"

FOX_TEXT = "The quick brown fox jumps over the lazy dog."
GO = [{"role": "user", "content": "go"}]


def _metrics(http) -> dict[tuple[str, frozenset], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples, name, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _wait_for_sessions(http, count: int, timeout: float = 5.0) -> dict:
    """Poll the summary until `count` finished sessions were folded in."""
    deadline = time.monotonic() + timeout
    while True:
        summary = http.get("/v1/monitor/summary").json()
        if summary["sessions"] >= count:
            return summary
        assert time.monotonic() < deadline, f"only {summary['sessions']} of {count} sessions reached the monitor"
        time.sleep(0.01)


def _sse(http, model="fox", messages=GO, headers=None):
    """(response headers, the chunk objects minus per-request ids) of one stream."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "messages": messages}
    response = http.post("/v1/chat/completions", json=body, headers=headers or {})
    events = []
    for event in (e for e in response.text.split("\n\n") if e):
        lines = event.splitlines()
        data = lines[-1].removeprefix("data: ")
        if data == "[DONE]":
            events.append(data)
            continue
        chunk = json.loads(data)
        chunk.pop("id", None), chunk.pop("created", None)
        events.append((lines[:-1], chunk))
    return response, events


def test_metrics_count_streams_tokens_first_tokens_and_outcomes():
    with start_server(MONITORED, session_retention_seconds=30) as server, server.http() as http:
        client = server.openai()
        for _ in range(2):
            reply = client.chat.completions.create(model="fox", messages=GO)
            assert reply.choices[0].message.content == FOX_TEXT
        response, fox_events = _sse(http, "fox")
        fox_session = response.headers["X-Session-ID"]
        assert fox_events[-1] == "[DONE]"

        broken = http.post("/v1/chat/completions", json={"model": "broken", "messages": GO})
        assert broken.status_code == 502
        _, midway_events = _sse(http, "breaks-midway")
        assert "error" in midway_events[-1][1]  # a terminal error event after three chunks

        with http.stream("POST", "/v1/chat/completions", json={"model": "slow", "stream": True, "messages": GO}) as slow:
            lines = slow.iter_lines()
            assert next(lines).startswith("id: 0")
            stop = http.post(f"/v1/sessions/{slow.headers['X-Session-ID']}/stop")
            assert stop.json()["stopped"] is True
            rest = "\n".join(lines)
        assert '"finish_reason":"stopped"' in rest

        summary = _wait_for_sessions(http, 6)
        samples = _metrics(http)
        fox_stats = http.get(f"/v1/monitor/sessions/{fox_session}").json()
        missing = http.get("/v1/monitor/sessions/sess_unknown")

    # Sessions by outcome.
    assert _value(samples, "streamvisor_sessions_total", model="fox", outcome="completed") == 3
    assert _value(samples, "streamvisor_sessions_total", model="broken", outcome="failed") == 1
    assert _value(samples, "streamvisor_sessions_total", model="breaks-midway", outcome="failed") == 1
    assert _value(samples, "streamvisor_sessions_total", model="slow", outcome="stopped") == 1
    assert _value(samples, "streamvisor_sessions_total") == 6
    assert _value(samples, "streamvisor_stream_errors_total", error_type="upstream_error") == 2
    # Tokens: nine words per fox answer, one prompt word per request.
    assert _value(samples, "streamvisor_stream_tokens_total", model="fox", type="output") == 27
    assert _value(samples, "streamvisor_stream_tokens_total", model="fox", type="input") == 3
    assert _value(samples, "streamvisor_stream_tokens_total", model="breaks-midway", type="output") == 3
    assert _value(samples, "streamvisor_stream_chunks_total", model="fox") == 27
    assert _value(samples, "streamvisor_stream_output_bytes_total", model="fox") == 3 * len(FOX_TEXT)
    # A first token for every session that streamed something; none for `broken`.
    assert _value(samples, "streamvisor_stream_time_to_first_token_seconds_count", model="fox") == 3
    assert _value(samples, "streamvisor_stream_time_to_first_token_seconds_count", model="breaks-midway") == 1
    assert _value(samples, "streamvisor_stream_time_to_first_token_seconds_count", model="broken") == 0
    assert _value(samples, "streamvisor_stream_time_to_first_token_seconds_count") == 5
    assert _value(samples, "streamvisor_stream_duration_seconds_count") == 6
    # Eight gaps between nine chunks, three times.
    assert _value(samples, "streamvisor_stream_chunk_gap_seconds_count", model="fox") == 24
    assert _value(samples, "streamvisor_stream_chunk_gap_seconds_bucket", model="fox", le="+Inf") == 24
    assert _value(samples, "streamvisor_sessions_active") == 0
    # The core's own HTTP histogram is served from the same registry.
    assert _value(samples, "streamvisor_http_request_duration_seconds_count", route="/v1/chat/completions") == 6

    assert summary["by_outcome"] == {"completed": 3, "failed": 2, "stopped": 1}
    fox = summary["by_model"]["fox"]
    assert fox["provider"] == "scripted" and fox["sessions"] == 3
    assert fox["ttft_ms"]["samples"] == 3 and fox["ttft_ms"]["p50"] <= fox["ttft_ms"]["p90"] <= fox["ttft_ms"]["p99"]
    assert fox["tokens_per_second"]["p50"] > 0
    assert fox["gaps"]["count"] == 24 and fox["gaps"]["histogram_seconds"][-1] == {"le": "+Inf", "count": 24}
    assert summary["by_model"]["broken"]["ttft_ms"]["p50"] is None
    assert fox_stats["outcome"] == "completed" and fox_stats["chunks"] == 9 and fox_stats["bytes"] == len(FOX_TEXT)
    assert fox_stats["tokens"]["completion"] == 9 and fox_stats["gaps"]["count"] == 8
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


REPORTED = ("emitter.one", "emitter.two", "emitter.three")


class Emitter:
    """A third-party middleware that reports three events of its own types for
    every session, as the retry and cache plugins report theirs."""

    @hookimpl
    def register_event_types(self, register):
        for kind in REPORTED:
            register(kind, "a test event")

    @hookimpl
    def register_middleware(self, register):
        async def emit(request, call_next, session):
            for kind in REPORTED:
                session.emit(kind, reason="test")
            async for delta in call_next(request):
                yield delta

        register(emit)


class Raiser:
    @hookimpl
    def on_event(self, event):
        raise RuntimeError(f"listener bug on {event.type}")


def test_listener_errors_and_reported_events_are_counted_per_plugin():
    # Per fox session: created, started, the three reported events, first_token,
    # ten chunk events (nine words and the finish) and completed.
    per_session = 17

    def raiser_errors(server):
        return next(s.errors for s in server.runtime.events.stats if s.plugin == "raiser")

    toml = MONITORED + "\n[plugins.emitter]\n[plugins.raiser]\n"
    with start_server(toml, plugins={"emitter": Emitter(), "raiser": Raiser()}) as server, server.http() as http:
        _sse(http, "fox")
        _wait_for_sessions(http, 1)
        server.wait_for(lambda: raiser_errors(server) == per_session)
        first = _metrics(http)
        _sse(http, "fox")
        _wait_for_sessions(http, 2)
        server.wait_for(lambda: raiser_errors(server) == 2 * per_session)
        second = _metrics(http)

    errors = "streamvisor_event_listener_errors_total"
    assert _value(first, errors, plugin="raiser") == per_session
    assert _value(second, errors, plugin="raiser") == 2 * per_session
    assert _value(second, errors, plugin="monitor") == 0
    # The monitor listens only to terminal and plugin-declared events: no chunk
    # or other life-cycle event is ever queued for it (listens_to).
    assert _value(second, "streamvisor_event_listener_delivered_total", plugin="monitor") == 2 * 4
    assert _value(second, "streamvisor_event_listener_dropped_total", plugin="monitor") == 0
    # It counts the other plugin's types without knowing their names.
    for kind in REPORTED:
        assert _value(second, "streamvisor_events_total", type=kind, model="fox", provider="scripted") == 2, kind


def test_active_sessions_gauge_follows_a_slow_stream():
    with start_server(MONITORED) as server, server.http() as http:
        assert _value(_metrics(http), "streamvisor_sessions_active") == 0
        with http.stream("POST", "/v1/chat/completions", json={"model": "slow", "stream": True, "messages": GO}) as slow:
            lines = slow.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("id: 0")
            session_id = slow.headers["X-Session-ID"]
            assert _value(_metrics(http), "streamvisor_sessions_active") == 1
            live = http.get(f"/v1/monitor/sessions/{session_id}").json()
            assert live["state"] == "running" and live["outcome"] is None and live["chunks"] >= 1
        # Closing the response disconnects the client; the session ends with it.
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        _wait_for_sessions(http, 1)
        samples = _metrics(http)
        finished = http.get(f"/v1/monitor/sessions/{session_id}").json()
    assert _value(samples, "streamvisor_sessions_active") == 0
    assert _value(samples, "streamvisor_sessions_total", model="slow", outcome="disconnected") == 1
    assert finished["outcome"] == "disconnected" and finished["reason"] == "disconnected"


def test_session_stats_show_the_pace_of_a_stream_and_its_log_line_the_request_id(caplog):
    with start_server(MONITORED) as server, server.http() as http:
        with caplog.at_level(logging.INFO, logger="streamvisor.monitor"):
            response, events = _sse(http, "paced", headers={"X-Request-ID": "paced-42"})
            session_id = response.headers["X-Session-ID"]
            _wait_for_sessions(http, 1)
        stats = http.get(f"/v1/monitor/sessions/{session_id}").json()
        summary = http.get("/v1/monitor/summary").json()

    assert events[-1] == "[DONE]"
    assert stats["outcome"] == "completed" and stats["request_id"] == "paced-42"
    assert stats["chunks"] == 6 and stats["bytes"] == len("one two three four five six")
    assert stats["tokens"] == {"prompt": 1, "completion": 6, "reasoning": 0, "exact": True}
    # delay = 0.05 s between six words: five gaps of at least 50 ms (generous above).
    gaps = stats["gaps"]
    assert gaps["count"] == 5
    assert 45 <= gaps["mean_ms"] <= 500 and gaps["mean_ms"] <= gaps["max_ms"] <= 1000
    # Six tokens over at least five 50 ms gaps: at most 24 tokens per second.
    assert 0 < stats["tokens_per_second"] <= 24.5
    assert stats["ttft_ms"] is not None and stats["duration_ms"] >= 250
    assert summary["by_model"]["paced"]["gaps"]["count"] == 5

    lines = [r for r in caplog.records if r.name == "streamvisor.monitor"]
    assert len(lines) == 1
    line = lines[0]
    assert line.request_id == "paced-42" and line.session_id == session_id
    message = line.getMessage()
    assert message.startswith("session completed:")
    for part in ("model=paced", "provider=scripted", "chunks=6", "tokens=1+6", "ttft=", "duration=", "tok/s="):
        assert part in message, part


def test_log_sessions_false_writes_no_line(caplog):
    toml = MONITORED + "log_sessions = false\n"
    with start_server(toml) as server, server.http() as http:
        with caplog.at_level(logging.INFO, logger="streamvisor.monitor"):
            _sse(http, "fox")
            _wait_for_sessions(http, 1)
    assert not [r for r in caplog.records if r.name == "streamvisor.monitor"]


def test_the_monitor_never_changes_the_stream():
    cases = [
        ("fox", GO),
        ("thinker", GO),  # reasoning first, then non-ASCII content
        ("echo", [{"role": "user", "content": "naïve café — 東京 🚀"}]),
        ("breaks-midway", GO),
    ]
    with start_server(SCRIPTED + MORE_MODELS) as plain, plain.http() as http:
        expected = [_sse(http, model, messages)[1] for model, messages in cases]
        expected_reply = http.post("/v1/chat/completions", json={"model": "thinker", "messages": GO}).json()
    with start_server(MONITORED) as monitored, monitored.http() as http:
        got = [_sse(http, model, messages)[1] for model, messages in cases]
        reply = http.post("/v1/chat/completions", json={"model": "thinker", "messages": GO}).json()
        _wait_for_sessions(http, len(cases) + 1)
        thinker = http.get("/v1/monitor/summary").json()["by_model"]["thinker"]
    for error_event in (expected[-1][-1][1], got[-1][-1][1]):
        error_event.pop("request_id"), error_event.pop("timestamp")
    assert got == expected
    for body in (reply, expected_reply):
        body.pop("id"), body.pop("created")
    assert reply == expected_reply
    # Reasoning and content bytes are both counted, as UTF-8.
    per_stream = len("hmm, let me think".encode()) + len("Grüße aus Köln ☕".encode())
    assert thinker["bytes"] == 2 * per_stream


def test_tracking_and_retention_are_bounded():
    toml = MONITORED + "max_tracked_sessions = 1\nretained_sessions = 2\n"
    with start_server(toml) as server, server.http() as http:
        ids = []
        for _ in range(3):
            response, _ = _sse(http, "fox")
            ids.append(response.headers["X-Session-ID"])
        _wait_for_sessions(http, 3)
        # Two slow streams at once, room to time one: the second goes untimed,
        # and streams all the same.
        body = {"model": "slow", "stream": True, "messages": GO}
        with http.stream("POST", "/v1/chat/completions", json=body) as first, http.stream("POST", "/v1/chat/completions", json=body) as second:
            readers = [response.iter_lines() for response in (first, second)]  # kept open
            for lines in readers:
                for expected in ("id: 0", "data: ", "", "id: 1"):
                    assert next(lines).startswith(expected)
            assert http.get("/v1/monitor/summary").json()["tracked"] == 1
        _wait_for_sessions(http, 5)
        statuses = [http.get(f"/v1/monitor/sessions/{sid}").status_code for sid in ids]
        summary = http.get("/v1/monitor/summary").json()
        samples = _metrics(http)
        monitor = server.runtime._host.plugins["monitor"].plugin
        tracked_after = server.call(lambda: len(monitor.tracked))
    # Five sessions finished, two retained: the three fox sessions are gone.
    assert statuses == [404, 404, 404]
    assert summary["untracked"] == 1 and summary["by_outcome"] == {"completed": 3, "disconnected": 2}
    assert _value(samples, "streamvisor_monitor_untracked_sessions_total") == 1
    assert tracked_after == 0  # finished sessions leave nothing tracked


@pytest.mark.parametrize(
    "table",
    ["gap_buckets = []", "ttft_buckets = [1, 0.5]", "duration_buckets = [-1]", "max_tracked_sessions = 0", "log_sessions = 'yes'"],
)
def test_bad_settings_stop_start_up(table):
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config(f"[plugins.monitor]\n{table}\n"))
    assert "plugins.monitor" in str(caught.value)
