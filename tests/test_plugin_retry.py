"""The `retry` plugin against real servers: retries before the first chunk only,
Retry-After, refused requests, fallback chains, per-provider/per-model policies
and the circuit breaker (with its health check and metrics).

Upstream failures come from the scripted provider (`fail_first`, `fail_after`)
and from a small stdlib HTTP server speaking the OpenAI wire format, reached
through the `openai` provider.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from streamvisor.config import ConfigError
from streamvisor.core.events import TERMINAL_TYPES
from streamvisor.hooks import PluginHost, hookimpl
from streamvisor.plugins.retry import CircuitBreaker, CircuitSettings

from .conftest import make_config, start_server
from streamvisor.testing import FakeUpstream

TEXT = "The quick brown fox jumps over the lazy dog."

#: Fast backoff, so that tests spend their time on what they check.
FAST = """
[plugins.retry]
attempts = 3
backoff_initial = 0.01
backoff_max = 0.05
jitter = 0.01
"""


class Probe:
    """A listener that records events, plus a route that runs the readiness
    checks (what the health plugin's /health/ready does)."""

    def __init__(self):
        self.events = []
        self.runtime = None

    @hookimpl
    def startup(self, runtime):
        self.runtime = runtime

    @hookimpl
    def on_event(self, event):
        self.events.append(event)

    @hookimpl
    def register_routes(self, register):
        async def ready():
            checks = {}
            for name, check in self.runtime.health_checks.items():
                health = await check()
                checks[name] = {"ok": health.ok, "detail": health.detail}
            return checks

        register("/test/ready", ready)

    def of(self, session_id, *types):
        return [e for e in list(self.events) if e.session_id == session_id and (not types or e.type in types)]


def _finished(server, probe, session_id):
    server.wait_for(lambda: bool(probe.of(session_id, *TERMINAL_TYPES)))
    return probe.of(session_id)


def _calls(server, model):
    return server.call(lambda: server.runtime.providers.get("scripted").requests[model])


def _metric(server, name, **labels):
    return server.call(lambda: server.runtime.metrics.get_sample_value(name, labels))


def _ask(server, model, stream=False):
    with server.http() as http:
        return http.post("/v1/chat/completions", json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "go"}]})


# -- a fake OpenAI-compatible upstream -------------------------------------------------


def _sse_body(text):
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}]
    words = text.split(" ")
    pieces = [word + " " for word in words[:-1]] + words[-1:]
    chunks += [{"choices": [{"delta": {"content": piece}}]} for piece in pieces]
    chunks += [
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}},
    ]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _fake(text="fake upstream answer"):
    """A stdlib upstream whose default answer is a valid stream of `text`."""
    return FakeUpstream(200, _sse_body(text), {"Content-Type": "text/event-stream"})


@pytest.fixture
def fake():
    fake = _fake()
    yield fake
    fake.close()


def _upstream(fake, name="fake", models=("m1",)):
    return f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "{name}"
base_url = "{fake.url}"
models = {json.dumps(list(models))}
read_timeout = 5
"""


# -- retries before the first chunk, never after ----------------------------------------

SCRIPTED_FAILURES = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "flaky"
fail_first = 2

[[plugins.scripted.models]]
name = "breaks-midway"
text = "one two three four five six"
fail_after = 3

[[plugins.scripted.models]]
name = "refused"
fail_first = 1000000
error_status = 400

[[plugins.scripted.models]]
name = "fails-twice-then-three-attempts"
fail_first = 2

[[plugins.scripted.models]]
name = "fails-twice-then-two-attempts"
fail_first = 2

[plugins.retry.providers.scripted]
attempts = 2

[plugins.retry.models.flaky]
attempts = 3

[plugins.retry.models.breaks-midway]
attempts = 3

[plugins.retry.models.fails-twice-then-three-attempts]
attempts = 3

[plugins.retry.circuit]
enabled = false  # these tests fail on purpose, often

[plugins.probe]
"""


@pytest.fixture(scope="module")
def failures():
    probe = Probe()
    with start_server(FAST + SCRIPTED_FAILURES, plugins={"probe": probe}) as server:
        yield server, probe


def test_two_failures_then_success_is_one_clean_stream_with_two_retry_events(failures):
    server, probe = failures
    raw = server.openai().chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "go"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())  # the client sees no error
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT  # once: no output of the failed attempts, nothing twice
    assert chunks[-1].usage.completion_tokens == 9
    session_id = raw.headers["X-Session-ID"]
    events = _finished(server, probe, session_id)
    retries = [e.data for e in events if e.type == "retry"]
    assert [r["attempt"] for r in retries] == [2, 3]
    for retry in retries:
        assert retry["reason"] == "server_error" and retry["status"] == 502
        assert retry["model"] == "flaky" and retry["provider"] == "scripted"
        assert 0 <= retry["delay"] <= 0.06 and "scripted failure" in retry["error"]
    assert events[-1].type == "completed"
    assert _calls(server, "flaky") == 3
    assert _metric(server, "streamvisor_upstream_retries_total", reason="server_error", provider="scripted") >= 2


def test_a_failure_after_the_first_chunk_is_not_retried(failures):
    server, probe = failures
    raw = server.openai().chat.completions.with_raw_response.create(
        model="breaks-midway", messages=[{"role": "user", "content": "go"}], stream=True
    )
    stream, received = raw.parse(), []
    with pytest.raises(openai.APIError, match="scripted failure after 3 chunks"):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two three"
    assert _calls(server, "breaks-midway") == 1  # attempts = 3, yet called once
    events = _finished(server, probe, raw.headers["X-Session-ID"])
    assert not [e for e in events if e.type in ("retry", "fallback")]
    assert events[-1].type == "failed" and events[-1].usage.completion_tokens == 3


def test_a_refused_request_is_not_retried(failures):
    server, probe = failures
    response = _ask(server, "refused")
    assert response.status_code == 400
    assert _calls(server, "refused") == 1
    events = _finished(server, probe, response.headers["X-Session-ID"])
    assert not [e for e in events if e.type == "retry"]


def test_a_model_policy_wins_over_its_providers(failures):
    server, _ = failures
    # [plugins.retry.providers.scripted] attempts = 2: two failures use them up.
    response = _ask(server, "fails-twice-then-two-attempts")
    assert response.status_code == 502
    assert _calls(server, "fails-twice-then-two-attempts") == 2
    # [plugins.retry.models.NAME] attempts = 3 on the same provider: the third succeeds.
    response = _ask(server, "fails-twice-then-three-attempts")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == TEXT
    assert _calls(server, "fails-twice-then-three-attempts") == 3


# -- an OpenAI-compatible upstream: 429, 400, the default policy ------------------------------


def test_a_429_waits_for_its_retry_after(fake):
    fake.then(429, b'{"error": {"message": "slow down"}}', Retry_After="1")
    probe = Probe()
    toml = FAST + _upstream(fake) + "\n[plugins.probe]\n"
    with start_server(toml, plugins={"probe": probe}) as server:
        client = server.openai()
        t0 = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(model="m1", messages=[{"role": "user", "content": "go"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        elapsed = time.perf_counter() - t0
        assert text == "fake upstream answer"
        assert 0.9 <= elapsed <= 3.0  # Retry-After: 1, not the 10 ms backoff
        assert fake.posts == 2
        (retry,) = [e.data for e in _finished(server, probe, raw.headers["X-Session-ID"]) if e.type == "retry"]
        assert retry["reason"] == "rate_limit" and retry["delay"] == 1.0 and retry["provider"] == "fake"


def test_a_client_that_leaves_during_the_wait_cancels_the_retry(fake):
    fake.then(429, b'{"error": {"message": "slow down"}}', Retry_After="1")
    with start_server(FAST + _upstream(fake)) as server:
        with pytest.raises(httpx.ReadTimeout), server.http(timeout=0.3) as http:
            http.post("/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": "go"}]})
        sessions = lambda: [s.state for s in server.runtime.sessions]  # noqa: E731
        server.wait_for(lambda: sessions() == ["disconnected"], timeout=0.5)  # not after the 1 s wait
        time.sleep(1.0)
        assert fake.posts == 1  # the retry never happened


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(fake):
    fake.then(429, b'{"error": {"message": "slow down"}}', Retry_After="5")
    toml = FAST + "deadline = 2\n" + _upstream(fake)
    with start_server(toml) as server:
        t0 = time.perf_counter()
        response = _ask(server, "m1")
        assert time.perf_counter() - t0 < 1.5
        assert response.status_code == 429 and response.headers["Retry-After"] == "5"
        assert fake.posts == 1


def test_a_400_from_the_upstream_is_not_retried(fake):
    fake.then(400, b'{"error": {"message": "context too long"}}')
    with start_server(FAST + _upstream(fake)) as server:
        response = _ask(server, "m1")
        assert response.status_code == 400 and "context too long" in response.json()["error"]["message"]
        assert fake.posts == 1


def test_5xx_and_unreachable_upstreams_are_retried(fake):
    fake.then(503, b'{"error": {"message": "overloaded"}}')
    fake.then(500, b'{"error": {"message": "oops"}}')
    with start_server(FAST + _upstream(fake)) as server:
        response = _ask(server, "m1", stream=True)
        assert response.status_code == 200 and "fake" in response.text
        assert fake.posts == 3
    fake.close()  # nothing listens any more: connect errors
    toml = FAST + _upstream(fake).replace("read_timeout = 5", "connect_timeout = 1")
    probe = Probe()
    with start_server(toml + "\n[plugins.probe]\n", plugins={"probe": probe}) as server:
        response = _ask(server, "m1")
        assert response.status_code == 502 and "unreachable" in response.json()["error"]["message"]
        retries = [e.data for e in _finished(server, probe, response.headers["X-Session-ID"]) if e.type == "retry"]
        assert [r["reason"] for r in retries] == ["connect", "connect"]


# -- fallback chains --------------------------------------------------------------------


def test_a_broken_model_falls_back_to_a_working_one_on_another_provider(fake):
    probe = Probe()
    toml = (
        FAST
        + """
[plugins.retry.models.broken]
attempts = 2

[plugins.retry.fallbacks]
broken = ["no-such-model", "m1"]

[plugins.scripted]
[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000
"""
        + _upstream(fake)
        + "\n[plugins.probe]\n"
    )
    with start_server(toml, plugins={"probe": probe}) as server:
        raw = server.openai().chat.completions.with_raw_response.create(model="broken", messages=[{"role": "user", "content": "go"}], stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == "fake upstream answer"
        assert raw.headers["X-Fallback-Model"] == "m1"
        assert _calls(server, "broken") == 2 and fake.posts == 1
        events = _finished(server, probe, raw.headers["X-Session-ID"])
        assert [e.type for e in events if e.type in ("retry", "fallback")] == ["retry", "fallback"]
        (fallback,) = [e.data for e in events if e.type == "fallback"]
        assert fallback["from_model"] == "broken" and fallback["to_model"] == "m1"
        assert fallback["from_provider"] == "scripted" and fallback["to_provider"] == "fake"
        assert fallback["reason"] == "server_error"
        assert events[-1].type == "completed" and events[-1].model == "broken"  # the session keeps the client's model
        assert _metric(server, "streamvisor_upstream_fallbacks_total", reason="server_error") == 1


# -- the circuit breaker ------------------------------------------------------------------


def test_the_circuit_opens_fails_fast_shows_in_health_and_a_probe_closes_it():
    probe = Probe()
    toml = """
[plugins.retry]
attempts = 1

[plugins.retry.circuit]
failures = 3
window = 30
cooldown = 1

[plugins.scripted]
[[plugins.scripted.models]]
name = "flaky"
fail_first = 3

[plugins.probe]
"""
    with start_server(toml, plugins={"probe": probe}) as server, server.http() as http:
        state = lambda: _metric(server, "streamvisor_upstream_circuit_state", provider="scripted")  # noqa: E731
        assert state() == 0 and http.get("/test/ready").json()["retry:circuits"]["ok"] is True
        for _ in range(3):
            assert _ask(server, "flaky").status_code == 502
        assert _calls(server, "flaky") == 3
        assert state() == 2
        # Open: requests fail fast, without calling the provider.
        t0 = time.perf_counter()
        response = _ask(server, "flaky")
        assert time.perf_counter() - t0 < 0.5
        assert response.status_code == 503 and response.json()["error"]["code"] == "circuit_open"
        assert response.headers["Retry-After"] == "1"
        assert _calls(server, "flaky") == 3
        check = http.get("/test/ready").json()["retry:circuits"]
        assert check["ok"] is False and check["detail"]["open"] == ["scripted"]
        assert check["detail"]["circuits"]["scripted"]["state"] == "open"
        # After the cooldown it is half-open: the next request is the probe, and it
        # succeeds (fail_first is used up), which closes the circuit.
        time.sleep(1.05)
        assert state() == 1
        assert http.get("/test/ready").json()["retry:circuits"]["detail"]["circuits"]["scripted"]["state"] == "half_open"
        response = _ask(server, "flaky")
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == TEXT
        assert _calls(server, "flaky") == 4
        assert state() == 0
        check = http.get("/test/ready").json()["retry:circuits"]
        assert check["ok"] is True and check["detail"]["circuits"]["scripted"]["state"] == "closed"


def test_an_open_circuit_goes_straight_to_the_fallback(fake):
    probe = Probe()
    toml = (
        """
[plugins.retry]
attempts = 1

[plugins.retry.circuit]
failures = 1
cooldown = 60

[plugins.retry.fallbacks]
broken = ["m1"]

[plugins.scripted]
[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000
"""
        + _upstream(fake)
        + "\n[plugins.probe]\n"
    )
    with start_server(toml, plugins={"probe": probe}) as server:
        assert _ask(server, "broken").status_code == 200  # fails once (opens), falls back
        response = _ask(server, "broken")
        assert response.status_code == 200 and response.headers["X-Fallback-Model"] == "m1"
        assert _calls(server, "broken") == 1 and fake.posts == 2  # the open circuit skipped scripted
        (fallback,) = [e.data for e in _finished(server, probe, response.headers["X-Session-ID"]) if e.type == "fallback"]
        assert fallback["reason"] == "circuit_open"


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, message",
    [
        ('retry_on = ["timeout", "sometimes"]', "plugins.retry.retry_on[1]: expected one of 'connect', 'timeout'"),
        ("[plugins.retry.models.x]\nattempts = 0", "plugins.retry.models.x: expected a valid value, found attempts must be at least 1"),
        ('[plugins.retry.fallbacks]\nx = ["x"]', "fallbacks.x names the model itself"),
        ("[plugins.retry.circuit]\ncooldown = -1", "cooldown must be greater than 0"),
    ],
)
def test_wrong_settings_stop_start_up_naming_the_key(table, message):
    toml = "[plugins.scripted]\n[plugins.retry]\n" + table
    with pytest.raises(ConfigError) as failure:
        PluginHost.from_config(make_config(toml))
    assert message in str(failure.value)


def test_the_circuit_breaker_state_machine():
    """The breaker alone, on a clock the test turns: the window, the single probe,
    and a probe that ends without a verdict."""
    now = [0.0]
    breaker = CircuitBreaker("up", CircuitSettings(failures=2, window=10, cooldown=5), clock=lambda: now[0])
    breaker.failed()
    now[0] = 11.0  # the first failure has left the window
    breaker.failed()
    assert breaker.state == "closed" and breaker.admit() == "pass"
    breaker.failed()
    assert breaker.state == "open" and breaker.admit() is None and breaker.retry_in() == 5
    now[0] = 16.0
    assert breaker.state == "half_open"
    assert breaker.admit() == "probe" and breaker.admit() is None  # one probe at a time
    breaker.abandoned()  # e.g. the client left: the next request probes instead
    assert breaker.admit() == "probe"
    breaker.failed()
    assert breaker.state == "open" and breaker.opened == 2
    now[0] = 21.0
    assert breaker.admit() == "probe"
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.admit() == "pass"
