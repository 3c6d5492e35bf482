"""The `openai` provider against real OpenAI-compatible servers on loopback:
another streamvisor (scripted) for the happy path and cancellation, and a small
stdlib HTTP server for the failure modes."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from .conftest import SCRIPTED, start_server
from streamvisor.testing import FakeUpstream, closed_port


@pytest.fixture(scope="module")
def upstream():
    with start_server(SCRIPTED, session_retention_seconds=60) as server:
        yield server


def _through(upstream_server, extra="", **env):
    return f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "up"
base_url = "{upstream_server.base}"
api_key = "${{TEST_UPSTREAM_KEY:-sk-test}}"
read_timeout = 10
{extra}
"""


def test_models_are_discovered_and_completions_relayed(upstream):
    with start_server(_through(upstream)) as gateway:
        client = gateway.openai()
        ids = {m.id for m in client.models.list()}
        assert {"fox", "slow", "echo"} <= ids
        assert {m.owned_by for m in client.models.list()} == {"up"}
        reply = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "The quick brown fox jumps over the lazy dog."
        assert reply.usage.completion_tokens == 9 and reply.usage.prompt_tokens == 1
        stream = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "über alles"}], stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "über alles"
        assert chunks[-1].usage.completion_tokens == 2
        session = gateway.call(lambda: list(gateway.runtime.sessions)[-1])
        assert session.usage.exact  # the upstream's own counts


def test_aliases_map_to_upstream_names(upstream):
    extra = 'aliases = { quick = "fox" }\nmodels = ["echo"]'
    with start_server(_through(upstream, extra)) as gateway:
        client = gateway.openai()
        assert sorted(m.id for m in client.models.list()) == ["echo", "quick"]
        reply = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content.startswith("The quick brown fox")
        assert reply.model == "quick"


def test_client_disconnect_closes_the_upstream_request(upstream):
    with start_server(_through(upstream)) as gateway:
        body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}).encode()
        host, port = gateway.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while data.count(b"data: ") < 3:
            data += sock.recv(65536)
        live_upstream = upstream.call(lambda: [s.id for s in upstream.runtime.sessions.live()])
        assert len(live_upstream) == 1
        (upstream_id,) = live_upstream
        sock.close()
        closed = time.perf_counter()
        upstream.wait_for(lambda: upstream.runtime.sessions.get(upstream_id).finished, timeout=3)
        upstream_session = upstream.call(lambda: upstream.runtime.sessions.get(upstream_id))
        assert upstream_session.state == "disconnected"  # the upstream saw its connection close
        assert upstream_session.finished_mono - closed < 1.0
        gateway_sessions = gateway.call(lambda: [(s.state, s.usage.completion_tokens) for s in gateway.runtime.sessions])
        assert gateway_sessions[0][0] == "disconnected" and gateway_sessions[0][1] >= 2


def test_stop_closes_the_upstream_request(upstream):
    with start_server(_through(upstream)) as gateway:
        client = gateway.openai()
        raw = client.chat.completions.with_raw_response.create(model="slow", messages=[{"role": "user", "content": "go"}], stream=True)
        stream = raw.parse()
        finishes = []
        for i, chunk in enumerate(stream):
            if i == 3:
                httpx.post(f"{gateway.base}/sessions/{raw.headers['X-Session-ID']}/stop")
            finishes.append(chunk.choices[0].finish_reason)
        assert finishes[-1] == "stopped"
        upstream.wait_for(lambda: upstream.runtime.sessions.live_count == 0, timeout=3)


# -- failure modes, from a stdlib server ---------------------------------------------


@pytest.fixture(scope="module")
def fake():
    fake = FakeUpstream()
    toml = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "fake"
base_url = "{fake.url}"
api_key = "${{TEST_FAKE_KEY:-sk-from-env-default}}"
read_timeout = 0.5
"""
    with start_server(toml) as gateway:
        yield fake, gateway
    fake.close()


SSE = {"Content-Type": "text/event-stream"}


def _sse(*payloads):
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads)


def _post(gateway, stream=False):
    with gateway.http() as http:
        return http.post("/v1/chat/completions", json={"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "x"}]})


def test_the_api_key_is_sent_as_a_bearer_token(fake):
    upstream, gateway = fake
    upstream.respond(200, _sse({"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}, b"[DONE]"), SSE)
    assert _post(gateway).json()["choices"][0]["message"]["content"] == "ok"
    assert upstream.seen_auth[-1] == "Bearer sk-from-env-default"


def test_upstream_usage_and_reasoning_and_tool_calls_are_relayed(fake):
    upstream, gateway = fake
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":'}}
    body = _sse(
        {"choices": [{"delta": {"role": "assistant", "reasoning_content": "thinking"}}]},
        {"choices": [{"delta": {"tool_calls": [call]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "completion_tokens_details": {"reasoning_tokens": 1}}},
        b"[DONE]",
    )
    upstream.respond(200, body, SSE)
    body = _post(gateway).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "thinking"
    assert message["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["completion_tokens"] == 7
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 1}


@pytest.mark.parametrize(
    "status, expected, code",
    [(500, 502, "upstream_error"), (503, 502, "upstream_error"), (401, 502, "upstream_error"), (400, 400, "upstream_rejected_request")],
)
def test_upstream_error_statuses_map_to_clear_errors(fake, status, expected, code):
    upstream, gateway = fake
    upstream.respond(status, json.dumps({"error": {"message": f"upstream says {status}"}}).encode(), {"Content-Type": "application/json"})
    response = _post(gateway, stream=True)
    assert response.status_code == expected
    error = response.json()["error"]
    assert error["code"] == code
    assert f"upstream says {status}" in error["message"] and "'fake'" in error["message"]


def test_a_429_keeps_its_retry_after(fake):
    upstream, gateway = fake
    upstream.respond(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "7"})
    response = _post(gateway)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_silent_upstream_times_out_with_504(fake):
    upstream, gateway = fake
    upstream.respond(200)
    upstream.delay = 2.0
    try:
        t0 = time.perf_counter()
        response = _post(gateway)
        assert time.perf_counter() - t0 < 1.8  # read_timeout = 0.5 s, not the upstream's 2 s
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
    finally:
        upstream.delay = 0


def test_an_error_mid_stream_reaches_the_client(fake):
    upstream, gateway = fake
    upstream.respond(200, _sse({"choices": [{"delta": {"content": "partial"}}]}, {"error": {"message": "model crashed"}}), SSE)
    client = openai.OpenAI(base_url=gateway.base, api_key="x", max_retries=0)
    with client:
        stream = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.APIError, match="model crashed"):
            for _ in stream:
                pass


def test_an_unreachable_upstream_is_502():
    port = closed_port()
    toml = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "gone"
base_url = "http://127.0.0.1:{port}/v1"
models = ["m"]
connect_timeout = 1
"""
    with start_server(toml) as gateway, gateway.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 502
        assert "unreachable" in response.json()["error"]["message"]


def test_a_proxy_variable_is_not_ignored_silently(monkeypatch, caplog):
    from streamvisor.plugins.openai_upstream import OpenAIUpstream, Upstream

    for name in ("HTTP_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    with caplog.at_level("WARNING", logger="streamvisor.plugins.openai"):
        OpenAIUpstream(Upstream(base_url="https://api.example.com/v1", name="hosted"))
        OpenAIUpstream(Upstream(base_url="https://models.internal/v1", name="inside"))
        OpenAIUpstream(Upstream(base_url="http://127.0.0.1:8001/v1", name="plain"))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "upstream 'hosted' (https://api.example.com/v1) is reached directly: HTTPS_PROXY is set, but streamvisor does not go through proxies"
    ]

