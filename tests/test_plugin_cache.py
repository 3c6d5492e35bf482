"""The `cache` plugin against real servers (and a real Redis at 127.0.0.1:6379):
hits and misses, replay as a stream, what is cacheable, what is never stored,
the LRU's byte budget and TTL, a Redis cache shared by two instances, Redis
failures that leave requests working, admin routes, metrics and readiness."""

from __future__ import annotations

import json
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import pytest
import trio

from streamvisor.core.chat import Delta, Usage
from streamvisor.core.providers import ModelInfo
from streamvisor.hooks import hookimpl

from .conftest import CI, start_server
from streamvisor.testing import closed_port

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_KEY = "cache-test-admin-key"

MODELS = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "thinker"
reasoning = "First the question, then the answer."
text = "The answer is forty two."

[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "long"
text = "one two three four five"
repeat = 60

[[plugins.scripted.models]]
name = "slow"
text = "tick"
repeat = 10000
delay = 0.02

[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000

[[plugins.scripted.models]]
name = "breaks-midway"
text = "one two three four five six"
fail_after = 3
"""


def config(**cache: Any) -> str:
    lines = ["[plugins.cache]"] + [f"{name} = {json.dumps(value)}" for name, value in cache.items()]
    return "\n".join(lines) + "\n" + MODELS


# -- clients -------------------------------------------------------------------


def chat(server, model="fox", content="go", *, stream=True, **params):
    """One completion over HTTP: (response headers, chunk deltas, finish_reason,
    usage); a non-streaming one gives its message as the only delta, or its
    status code instead when it failed. Temperature 0 unless given (None leaves
    it unset)."""
    params.setdefault("temperature", 0)
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    body.update({k: v for k, v in params.items() if v is not None})
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = server.http().post("/v1/chat/completions", json=body)
    if not stream:
        if response.status_code != 200:
            return response.headers, response.status_code, None, None
        choice = response.json()["choices"][0]
        return response.headers, [choice["message"]], choice["finish_reason"], response.json()["usage"]
    assert response.status_code == 200, response.text
    deltas, finish, usage = [], None, None
    for event in response.text.split("\n\n"):
        data = next((line[6:] for line in event.splitlines() if line.startswith("data: ")), None)
        if data is None or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            finish = "error"
            continue
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        choice = chunk["choices"][0]
        deltas.append(choice["delta"])
        finish = choice["finish_reason"] or finish
    return response.headers, deltas, finish, usage


def text_of(deltas, field="content"):
    return "".join(d.get(field) or "" for d in deltas)


def admin(server, method, path, key=ADMIN_KEY, **kwargs):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return server.http().request(method, path, headers=headers, **kwargs)


def status(server):
    response = admin(server, "GET", "/admin/cache/status")
    assert response.status_code == 200, response.text
    return response.json()


def provider_calls(server, model):
    return server.call(lambda: server.runtime.providers.get("scripted").requests[model])


def metric(server, name, labels=None):
    return server.call(lambda: server.runtime.metrics.get_sample_value(name, labels or {})) or 0.0


def run_in_server(server, async_fn):
    """Await `async_fn()` inside the server's trio loop."""
    return trio.from_thread.run(async_fn, trio_token=server._token)


def readiness(server):
    return run_in_server(server, server.runtime.health_checks["cache:backend"])


# -- Redis ---------------------------------------------------------------------


def redis_reachable() -> bool:
    try:
        with closing(socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    if not redis_reachable():
        if CI:
            pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}, and CI must run the Redis cache tests")
        pytest.skip(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}")


def redis_keys(prefix: str, delete: bool = False) -> list[bytes]:
    """The keys under `prefix` (deleted when `delete`), with a client of our own."""
    import coredis

    async def run() -> list[bytes]:
        async with coredis.Redis(REDIS_HOST, REDIS_PORT) as client:
            keys = [key async for key in client.scan_iter(match=prefix + "*", count=500)]
            if delete and keys:
                await client.delete(keys)
            return keys

    return trio.run(run)


@pytest.fixture
def redis_prefix():
    require_redis()
    prefix = f"streamvisor-test:{secrets.token_hex(6)}:"
    yield prefix
    redis_keys(prefix, delete=True)


def redis_config(prefix: str, **cache: Any) -> str:
    return config(backend="redis", redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/0", key_prefix=prefix, **cache)


class EventRecorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def on_event(self, event):
        self.events.append(event)


# -- hits and misses -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_second_identical_request_is_a_hit_with_identical_content(backend, request, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    if backend == "redis":
        toml = redis_config(request.getfixturevalue("redis_prefix"))
    else:
        toml = config()
    recorder = EventRecorder()
    with start_server(toml + "\n[plugins.recorder]\n", plugins={"recorder": recorder}) as server:
        headers, first, finish, usage = chat(server)
        assert headers["X-Cache"] == "miss"
        assert text_of(first) == "The quick brown fox jumps over the lazy dog."
        key = headers["X-Cache-Key"]

        headers, again, finish_again, usage_again = chat(server)
        assert headers["X-Cache"] == "hit"
        assert headers["X-Cache-Key"] == key
        assert again == first and finish_again == finish == "stop"
        assert usage_again == usage  # the original answer's usage is reported
        assert provider_calls(server, "fox") == 1  # the provider was asked once

        # A non-streaming request for the same thing shares the entry.
        headers, message, finish, usage_plain = chat(server, stream=False)
        assert headers["X-Cache"] == "hit"
        assert message[0]["content"] == "The quick brown fox jumps over the lazy dog."
        assert usage_plain["completion_tokens"] == usage["completion_tokens"]

        # The caller's `user` is not part of the key; the parameters are.
        assert chat(server, user="someone-else")[0]["X-Cache"] == "hit"
        assert chat(server, max_tokens=3)[0]["X-Cache"] == "miss"
        assert chat(server, content="go on")[0]["X-Cache"] == "miss"
        assert chat(server, seed=7)[0]["X-Cache"] == "miss"
        assert chat(server, response_format={"type": "json_object"})[0]["X-Cache"] == "miss"
        assert provider_calls(server, "fox") == 5

        server.wait_for(lambda: sum(e.type == "cache_hit" for e in recorder.events) == 3)
        hit = next(e for e in recorder.events if e.type == "cache_hit")
        assert hit.model == "fox" and hit.data["key"] == key and hit.data["backend"] == backend
        assert metric(server, "streamvisor_cache_hits_total") == 3
        assert metric(server, "streamvisor_cache_misses_total") == 5
        assert metric(server, "streamvisor_cache_stores_total") == 5
        assert metric(server, "streamvisor_cache_errors_total", {"operation": "get"}) == 0
        body = status(server)
        assert body["backend"] == backend and body["reachable"] is True
        assert body["entries"] == 5 and body["bytes"] > 0
        assert (body["hits"], body["misses"], body["hit_rate"]) == (3, 5, 0.375)
        assert metric(server, "streamvisor_cache_entries") == 5
        assert metric(server, "streamvisor_cache_bytes") == body["bytes"]
        ready = readiness(server)
        assert ready.ok and ready.detail["backend"] == backend


class ToolProvider:
    """A provider whose answer has reasoning, content and a streamed tool call."""

    name = "tools"

    def __init__(self):
        self.calls = 0

    async def list_models(self):
        return [ModelInfo("tool-user", owned_by="test")]

    async def stream(self, request):
        self.calls += 1
        yield Delta(reasoning="I should ", usage=Usage(5, 1, 1))
        yield Delta(reasoning="look it up.", usage=Usage(5, 2, 2))
        yield Delta(content="Checking.", usage=Usage(5, 3, 2))
        yield Delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}])
        yield Delta(tool_calls=[{"index": 0, "function": {"arguments": '{"q": "fox"}'}}], usage=Usage(5, 6, 2))
        yield Delta(finish_reason="tool_calls")


class ToolPlugin:
    def __init__(self):
        self.provider = ToolProvider()

    @hookimpl
    def register_providers(self, register):
        register(self.provider)


def test_a_cached_stream_replays_as_chunks_with_reasoning_and_tool_calls():
    tools = ToolPlugin()
    with start_server(config() + "\n[plugins.tools]\n", plugins={"tools": tools}) as server:
        headers, first, finish, usage = chat(server, "thinker")
        assert headers["X-Cache"] == "miss"
        headers, replay, finish_again, usage_again = chat(server, "thinker")
        assert headers["X-Cache"] == "hit"
        # One chunk per word, as the provider streamed them: reasoning first, then content.
        assert len(replay) == len(first) >= 11
        assert replay == first
        kinds = ["reasoning" if d.get("reasoning_content") else "content" for d in replay if d.get("reasoning_content") or d.get("content")]
        assert kinds == ["reasoning"] * 6 + ["content"] * 5
        assert text_of(replay, "reasoning_content") == "First the question, then the answer."
        assert text_of(replay) == "The answer is forty two."
        assert usage_again == usage and usage["completion_tokens_details"]["reasoning_tokens"] == 6
        assert provider_calls(server, "thinker") == 1

        # A long answer replays whole, chunk for chunk.
        headers, first, finish, usage = chat(server, "long")
        headers, replay, finish_again, usage_again = chat(server, "long")
        assert headers["X-Cache"] == "hit"
        assert len(replay) == len(first) >= 300 and replay == first and usage_again == usage

        headers, first, finish, usage = chat(server, "tool-user")
        assert headers["X-Cache"] == "miss" and finish == "tool_calls"
        headers, replay, finish_again, usage_again = chat(server, "tool-user")
        assert headers["X-Cache"] == "hit"
        assert replay == first and finish_again == "tool_calls" and usage_again == usage
        headers, message, finish, _ = chat(server, "tool-user", stream=False)
        assert headers["X-Cache"] == "hit" and finish == "tool_calls"
        assert message[0]["reasoning_content"] == "I should look it up."
        assert message[0]["tool_calls"] == [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "fox"}'}}
        ]
        assert tools.provider.calls == 1


@pytest.mark.parametrize(
    "settings, temperature, cached",
    [
        ({}, 0.7, False),
        ({}, None, False),
        ({}, 0, True),
        ({"cache_nonzero_temperature": True}, 0.7, True),
        ({"cache_nonzero_temperature": True}, None, False),
        ({"cache_unset_temperature": True}, None, True),
        ({"cache_unset_temperature": True}, 0.7, False),
    ],
)
def test_temperature_decides_what_is_cached(settings, temperature, cached):
    with start_server(config(**settings)) as server:
        first = chat(server, temperature=temperature)[0]["X-Cache"]
        second = chat(server, temperature=temperature)[0]["X-Cache"]
        if cached:
            assert (first, second) == ("miss", "hit")
            assert provider_calls(server, "fox") == 1
        else:
            assert (first, second) == ("bypass", "bypass")
            assert provider_calls(server, "fox") == 2
            reason = "unset_temperature" if temperature is None else "nonzero_temperature"
            assert metric(server, "streamvisor_cache_bypasses_total", {"reason": reason}) == 2


# -- only complete answers are stored ------------------------------------------


def test_failed_stopped_disconnected_and_oversized_answers_are_not_stored(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    with start_server(config(max_entry_bytes=400)) as server:
        # Fails after three chunks: the client saw a partial answer and an error.
        for _ in range(2):
            headers, deltas, finish, _ = chat(server, "breaks-midway")
            assert headers["X-Cache"] == "miss" and finish == "error"
            assert text_of(deltas) == "one two three"
        # Fails before the first chunk.
        for _ in range(2):
            headers, status_code, _, _ = chat(server, "broken", stream=False)
            assert status_code == 502

        http = server.http()
        body = {"model": "slow", "temperature": 0, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        # Stopped after three chunks.
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["X-Cache"] == "miss"
            session_id = response.headers["X-Session-ID"]
            seen = 0
            finish = None
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                seen += 1
                if seen == 3:
                    assert server.http().post(f"/v1/sessions/{session_id}/stop").json()["stopped"] is True
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
            assert finish == "stopped"
        # Disconnected: the client goes away after two chunks.
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["X-Cache"] == "miss"
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["X-Cache"] == "miss"

        # A complete answer larger than max_entry_bytes.
        long_prompt = "word " * 200
        assert chat(server, "echo", long_prompt)[0]["X-Cache"] == "miss"
        assert chat(server, "echo", long_prompt)[0]["X-Cache"] == "miss"
        # ... while a short one is stored.
        assert chat(server, "echo", "short")[0]["X-Cache"] == "miss"
        assert chat(server, "echo", "short")[0]["X-Cache"] == "hit"

        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        body = status(server)
        assert body["entries"] == 1 and body["stores"] == 1


# -- the memory backend's bounds -----------------------------------------------


def test_the_lru_evicts_the_least_recently_used_within_its_byte_budget(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    prompts = {name: f"{name} " + "x" * 300 for name in ("alpha", "bravo", "charl")}
    # The size of one entry, measured on a server with room to spare.
    with start_server(config()) as server:
        assert chat(server, "echo", prompts["alpha"])[0]["X-Cache"] == "miss"
        one_entry = status(server)["bytes"]
    budget = int(one_entry * 2.5)  # room for two entries, not three
    with start_server(config(max_bytes=budget, max_entry_bytes=budget)) as server:

        def ask(name):
            return chat(server, "echo", prompts[name])[0]["X-Cache"]

        assert ask("alpha") == "miss"
        assert ask("bravo") == "miss"
        assert ask("alpha") == "hit"  # alpha is now the most recently used
        assert ask("charl") == "miss"  # storing charl evicts bravo, not alpha
        body = status(server)
        assert body["entries"] == 2 and body["bytes"] <= budget and body["evictions"] == 1
        assert ask("alpha") == "hit"
        assert ask("charl") == "hit"
        assert ask("bravo") == "miss"
        assert status(server)["bytes"] <= budget


def test_entries_expire_after_their_ttl(request):
    """A 1.5 s TTL, checked after a generous 3 s, on both backends at once."""
    backends = {"memory": config(ttl_seconds=1.5)}
    if CI or redis_reachable():
        backends["redis"] = redis_config(request.getfixturevalue("redis_prefix"), ttl_seconds=1.5)
    servers = {name: start_server(toml) for name, toml in backends.items()}
    running = {name: cm.__enter__() for name, cm in servers.items()}
    try:
        for name, server in running.items():
            assert chat(server)[0]["X-Cache"] == "miss", name
            assert chat(server)[0]["X-Cache"] == "hit", name
        time.sleep(3)
        for name, server in running.items():
            assert chat(server)[0]["X-Cache"] == "miss", name
            assert provider_calls(server, "fox") == 2
    finally:
        for cm in servers.values():
            cm.__exit__(None, None, None)


# -- Redis ---------------------------------------------------------------------


def test_the_redis_cache_is_shared_by_two_instances(redis_prefix, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    toml = redis_config(redis_prefix)
    with start_server(toml) as a, start_server(toml) as b:
        headers, on_a, finish, usage = chat(a, "thinker")
        assert headers["X-Cache"] == "miss"
        headers, on_b, finish_b, usage_b = chat(b, "thinker")
        assert headers["X-Cache"] == "hit"
        assert on_b == on_a and len(on_b) >= 11 and (finish_b, usage_b) == (finish, usage)
        assert provider_calls(a, "thinker") == 1 and provider_calls(b, "thinker") == 0
        assert status(a)["entries"] == status(b)["entries"] == 1

        # Many sessions use one instance's client at once.
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(lambda i: chat(b, "echo", f"prompt {i % 4}"), range(32)))
        assert all(text_of(deltas) == f"prompt {i % 4}" for i, (_, deltas, _, _) in enumerate(results))
        assert {headers["X-Cache"] for headers, *_ in results} <= {"hit", "miss"}
        assert status(a)["entries"] == 5
        assert all(chat(a, "echo", f"prompt {i}")[0]["X-Cache"] == "hit" for i in range(4))

        # An invalidation on one instance is seen by the other.
        removed = admin(b, "POST", "/admin/cache/invalidate", json={"model": "thinker"}).json()
        assert removed == {"removed": 1, "scope": "model", "model": "scripted:thinker"}
        assert chat(a, "thinker")[0]["X-Cache"] == "miss"
        assert chat(b, "thinker")[0]["X-Cache"] == "hit"
    assert redis_keys(redis_prefix)  # the entries live on in Redis (until their TTL)


class BlackHole:
    """A listening socket that never accepts: connections open and hang."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        return self

    def __exit__(self, *exc):
        self.sock.close()


@pytest.mark.parametrize("failure", ["refused", "hangs"])
def test_a_failing_redis_never_fails_a_request(failure, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    with BlackHole() as hole:
        port = closed_port() if failure == "refused" else hole.port
        toml = config(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0", backend_timeout_seconds=0.2)
        with start_server(toml) as server:
            for stream in (True, False, True):
                headers, deltas, finish, _ = chat(server, stream=stream)
                assert headers["X-Cache"] == "miss" and finish == "stop"
                assert text_of(deltas) == "The quick brown fox jumps over the lazy dog."
            assert provider_calls(server, "fox") == 3
            # Each request failed to look up and to store; all counted.
            assert metric(server, "streamvisor_cache_errors_total", {"operation": "get"}) == 3
            assert metric(server, "streamvisor_cache_errors_total", {"operation": "set"}) == 3
            assert metric(server, "streamvisor_cache_hits_total") == 0
            ready = readiness(server)
            # Degraded, not unready: requests are served, uncached.
            assert ready.ok and ready.detail["backend"] == "redis" and ready.detail["error"] and ready.detail["degraded"]
            body = status(server)
            assert body["reachable"] is False and body["entries"] is None and body["error"]
            response = admin(server, "POST", "/admin/cache/invalidate", json={"all": True})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "cache_backend_unavailable"


# -- admin ---------------------------------------------------------------------


def test_admin_routes_refuse_a_missing_or_wrong_key(monkeypatch):
    monkeypatch.delenv("STREAMVISOR_ADMIN_KEY", raising=False)
    with start_server(config()) as server:
        for method, path in (("GET", "/admin/cache/status"), ("POST", "/admin/cache/invalidate")):
            assert admin(server, method, path, json={"all": True}).status_code == 403  # disabled
        monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
        for method, path in (("GET", "/admin/cache/status"), ("POST", "/admin/cache/invalidate")):
            assert admin(server, method, path, key=None, json={"all": True}).status_code == 401
            assert admin(server, method, path, key="wrong", json={"all": True}).status_code == 401
        assert admin(server, "GET", "/admin/cache/status").status_code == 200


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_invalidate_removes_all_by_model_or_by_key(backend, request, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    toml = redis_config(request.getfixturevalue("redis_prefix")) if backend == "redis" else config()
    with start_server(toml) as server:

        def invalidate(body):
            response = admin(server, "POST", "/admin/cache/invalidate", json=body)
            assert response.status_code == 200, response.text
            return response.json()["removed"]

        def fill():
            keys = {}
            for model, content in (("fox", "a"), ("fox", "b"), ("thinker", "a"), ("echo", "a")):
                keys[model, content] = chat(server, model, content)[0]["X-Cache-Key"]
            return keys

        keys = fill()
        assert status(server)["entries"] == 4
        assert invalidate({"model": "fox"}) == 2
        assert chat(server, "fox", "a")[0]["X-Cache"] == "miss"
        assert chat(server, "thinker", "a")[0]["X-Cache"] == "hit"

        assert invalidate({"key": keys["thinker", "a"]}) == 1
        assert invalidate({"key": keys["thinker", "a"]}) == 0
        assert chat(server, "thinker", "a")[0]["X-Cache"] == "miss"
        assert chat(server, "echo", "a")[0]["X-Cache"] == "hit"

        assert status(server)["entries"] == 3
        assert invalidate({"all": True}) == 3
        body = status(server)
        assert body["entries"] == 0 and body["bytes"] == 0
        assert chat(server, "echo", "a")[0]["X-Cache"] == "miss"

        for bad in ({}, {"all": False}, {"model": ""}, {"key": "not-a-key"}, {"everything": True}, {"all": True, "model": "fox"}, []):
            response = admin(server, "POST", "/admin/cache/invalidate", json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]["type"] == "invalid_request_error"
        response = admin(server, "POST", "/admin/cache/invalidate", content=b"{nope")
        assert response.status_code == 400
