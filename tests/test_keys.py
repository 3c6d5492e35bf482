"""The keys plugin against real servers: API keys, the errors the official
`openai` client sees, rate limits and their headers, budgets and spend, privacy
of sessions and usage, the CLI, and limits shared by two server processes
through Redis."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from streamvisor.testing import closed_port

from .conftest import CI, SCRIPTED, ServerThread, make_config
from .test_store import serve_process

ADMIN_KEY = "keys-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REDIS = "redis://127.0.0.1:6379/0"
#: Prices (USD per million tokens) that make the scripted models' few tokens
#: cost something measurable.
FOX_INPUT, FOX_OUTPUT = 100.0, 200.0

MODELS = SCRIPTED  # fox, slow, echo, broken and breaks-midway (tests/conftest.py)


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)


def keys_toml(store: str, keys: str = "", extra: str = "") -> str:
    return f"""
[plugins.keys]
{keys}

[plugins.pricing]
[plugins.pricing.prices.fox]
input = {FOX_INPUT}
output = {FOX_OUTPUT}
[plugins.pricing.prices.slow]
input = {FOX_INPUT}
output = {FOX_OUTPUT}
[plugins.pricing.prices.breaks-midway]
input = {FOX_INPUT}
output = {FOX_OUTPUT}

[plugins.store]
url = "{store}"

[plugins.usage]
{extra}
{MODELS}
"""


@contextmanager
def keyed_server(tmp_path: Path, keys: str = "", extra: str = "") -> Iterator[ServerThread]:
    server = ServerThread(make_config(keys_toml(f"sqlite:///{tmp_path / 'store.db'}", keys, extra), session_retention_seconds=30)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with keyed_server(tmp_path) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    """A server whose limits are held in memory, or in Redis (the same Lua
    scripts several instances share)."""
    keys = ""
    if request.param == "redis":
        request.getfixturevalue("redis")
        keys = f'redis_url = "{REDIS}"\nkey_prefix = "test-keys-{uuid.uuid4().hex[:8]}:"'
    with keyed_server(tmp_path, keys) as server:
        yield server


def create_key(url: str, **fields: Any) -> tuple[str, str]:
    fields.setdefault("identity", "alice")
    r = httpx.post(f"{url}/admin/keys", json=fields, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    return body["id"], body["secret"]


def client(server: ServerThread, secret: str) -> openai.OpenAI:
    return server.openai(api_key=secret)


def chat(secret: str, url: str, model: str = "fox", **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


def fox_cost(prompt: int, completion: int) -> float:
    return (prompt * FOX_INPUT + completion * FOX_OUTPUT) / 1e6


# -- keys and the errors a client sees ----------------------------------------------------


def test_every_v1_route_needs_a_key_and_the_openai_client_gets_authentication_errors(server):
    anonymous = client(server, "no-key-of-ours")
    with pytest.raises(openai.AuthenticationError) as caught:
        anonymous.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "sk-sv-" + "A" * 32).models.list()
    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key" in caught.value.message
    http = server.http()
    for path in ("/v1/models", "/v1/sessions", "/v1/usage", "/v1/sessions/sess_0123/stream"):
        r = http.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert http.get("/openapi.json").status_code == 200  # outside /v1: no key

    _, secret = create_key(server.url)
    ok = client(server, secret)
    assert [m.id for m in ok.models.list().data]
    answer = ok.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content.startswith("The quick")
    # The admin key is accepted on /v1 too, and sees everything.
    assert http.get("/v1/models", headers=ADMIN).status_code == 200


def test_the_secret_is_shown_once_and_the_store_keeps_only_its_hash(server, tmp_path):
    key_id, secret = create_key(server.url, name="ci", team="eng", rpm_limit=5)
    assert secret.startswith("sk-sv-") and len(secret) >= 6 + 22  # at least 128 random bits
    shown = httpx.get(f"{server.url}/admin/keys/{key_id}", headers=ADMIN).json()
    assert "secret" not in shown and secret not in json.dumps(shown)
    assert shown["secret_prefix"] == secret[:10] and shown["rpm_limit"] == 5 and shown["team"] == "eng"
    listed = httpx.get(f"{server.url}/admin/keys", headers=ADMIN).json()
    assert [k["id"] for k in listed["data"]] == [key_id] and secret not in json.dumps(listed)
    # Straight from the database: every table, every text column.
    with sqlite3.connect(tmp_path / "store.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert secret not in dump
    assert secret[10:] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump


def test_revoked_and_expired_keys_are_refused_with_401(server):
    key_id, secret = create_key(server.url)
    assert chat(secret, server.url).status_code == 200
    r = httpx.delete(f"{server.url}/admin/keys/{key_id}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, secret).chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key" and "revoked" in caught.value.message

    _, expired = create_key(server.url, expires_at=time.time() - 1)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, expired).models.list()
    assert "expired" in caught.value.message


def test_rotation_gives_a_new_secret_and_the_old_one_stops_working(server):
    key_id, old = create_key(server.url)
    assert chat(old, server.url).status_code == 200
    r = httpx.post(f"{server.url}/admin/keys/{key_id}/rotate", headers=ADMIN)
    new = r.json()["secret"]
    assert new != old and r.json()["id"] == key_id
    assert chat(old, server.url).status_code == 401
    assert chat(new, server.url).status_code == 200


def test_a_model_the_key_may_not_use_is_403_model_not_allowed_and_not_listed(server):
    _, secret = create_key(server.url, models=["fo*", "echo"])
    ok = client(server, secret)
    assert sorted(m.id for m in ok.models.list().data) == ["echo", "fox"]
    httpx.put(f"{server.url}/admin/teams/narrow", json={"models": ["fox"]}, headers=ADMIN).raise_for_status()
    _, teamed = create_key(server.url, models=["fo*", "echo"], team="narrow")
    assert [m.id for m in client(server, teamed).models.list().data] == ["fox"]
    with pytest.raises(openai.PermissionDeniedError):
        client(server, teamed).chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert len(httpx.get(f"{server.url}/v1/models", headers=ADMIN).json()["data"]) >= 5  # the admin key sees every model
    assert ok.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}]).choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ok.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_allowed"


def test_admin_api_refuses_bad_fields_and_needs_the_admin_key(server):
    r = httpx.post(f"{server.url}/admin/keys", json={"identity": "a", "rpm_limit": 0}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "rpm_limit"
    r = httpx.post(f"{server.url}/admin/keys", json={"name": "x"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "identity"
    r = httpx.post(f"{server.url}/admin/keys", json={"identity": "a", "budget_period": "week"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "budget_period"
    _, secret = create_key(server.url)
    r = httpx.post(f"{server.url}/admin/keys", json={"identity": "a"}, headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/admin/keys/key_0000000000000000", headers=ADMIN).status_code == 404


# -- limits --------------------------------------------------------------------------------


def test_rpm_limit_refuses_with_429_and_the_openai_rate_limit_headers(limited):
    _, secret = create_key(limited.url, rpm_limit=3)
    remaining = []
    for _ in range(3):
        r = chat(secret, limited.url)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as caught:
        client(limited, secret).chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 60
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per minute" in caught.value.message


def test_tokens_are_reserved_up_front_and_given_back_when_the_answer_is_short(limited):
    # A reservation is the prompt estimate (1) plus max_tokens (60): with a
    # limit of 100 a second request passes only because the first one was
    # settled at its real size (1 + 10 tokens), not its reservation.
    _, secret = create_key(limited.url, tpm_limit=100)
    first = chat(secret, limited.url, max_tokens=60)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "39"
    second = chat(secret, limited.url, max_tokens=60)
    assert second.status_code == 200, second.text
    # Now about 22 used and 61 more reserved: a third reservation does not fit.
    third = chat(secret, limited.url, max_tokens=90)
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in third.json()["error"]["message"]


def test_concurrent_streams_are_limited_and_a_stopped_one_frees_its_place(limited):
    _, secret = create_key(limited.url, max_concurrent_streams=1)
    ok = client(limited, secret)
    stream = ok.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], stream=True)
    next(iter(stream))
    with pytest.raises(openai.RateLimitError) as caught:
        ok.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
    assert "concurrent streams" in caught.value.message
    stream.close()
    limited.wait_for(lambda: limited.runtime.sessions.live_count == 0)
    deadline = time.monotonic() + 5
    while chat(secret, limited.url).status_code == 429:
        assert time.monotonic() < deadline, "the disconnected stream kept its lease"
        time.sleep(0.02)


def test_a_team_limit_applies_to_every_key_of_the_team(limited):
    r = httpx.put(f"{limited.url}/admin/teams/eng", json={"rpm_limit": 2}, headers=ADMIN)
    assert r.status_code == 201
    _, one = create_key(limited.url, identity="alice", team="eng")
    _, two = create_key(limited.url, identity="bob", team="eng", rpm_limit=100)
    assert chat(one, limited.url).status_code == 200
    assert chat(two, limited.url).status_code == 200
    refused = chat(two, limited.url)
    assert refused.status_code == 429 and "team 'eng'" in refused.json()["error"]["message"]


# -- cost, spend and budgets ---------------------------------------------------------------


def test_a_stream_disconnected_midway_is_charged_its_partial_tokens_at_the_price_table(server):
    key_id, secret = create_key(server.url)
    stream = client(server, secret).chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], stream=True)
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 5:
            break
    stream.close()
    server.wait_for(lambda: server.runtime.sessions.live_count == 0)
    session = next(iter(server.runtime.sessions))
    assert session.state == "disconnected"
    usage = session.usage
    assert usage.completion_tokens >= 5 and usage.prompt_tokens == 1
    expected = fox_cost(usage.prompt_tokens, usage.completion_tokens)
    assert usage.cost_usd == pytest.approx(expected)
    # Nowhere near what was reserved (the default max_tokens).
    assert usage.completion_tokens < 1000

    def spent() -> float:
        return httpx.get(f"{server.url}/admin/keys/{key_id}", headers=ADMIN).json()["spend"]["cost_usd"]["total"]

    deadline = time.monotonic() + 5
    while spent() != pytest.approx(expected):
        assert time.monotonic() < deadline, f"spend {spent()} != {expected}"
        time.sleep(0.05)
    body = httpx.get(f"{server.url}/v1/sessions/{session.id}", headers={"Authorization": f"Bearer {secret}"}).json()
    assert body["usage"]["cost_usd"] == pytest.approx(expected)


@pytest.mark.parametrize("how", ["stopped", "failed"])
def test_a_stopped_or_failed_stream_is_charged_what_it_produced_and_gives_back_its_reservation(limited, how):
    key_id, secret = create_key(limited.url, max_budget_usd=100.0, max_concurrent_streams=5)
    auth = {"Authorization": f"Bearer {secret}"}
    if how == "stopped":
        session_id = chat(secret, limited.url, model="slow", background=True).json()["id"]
        deadline = time.monotonic() + 5
        while httpx.get(f"{limited.url}/v1/sessions/{session_id}", headers=auth).json()["chunks"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stopped = httpx.post(f"{limited.url}/v1/sessions/{session_id}/stop", headers=auth).json()
        assert stopped["stopped"] is True and stopped["state"] == "stopped"
    else:
        with pytest.raises(openai.APIError):
            for _ in client(limited, secret).chat.completions.create(model="breaks-midway", messages=[{"role": "user", "content": "hi"}], stream=True):
                pass
    limited.wait_for(lambda: limited.runtime.sessions.live_count == 0)
    session = next(iter(limited.runtime.sessions))
    assert session.state == how
    usage = session.usage
    assert usage.completion_tokens >= 3
    expected = fox_cost(usage.prompt_tokens, usage.completion_tokens)
    deadline = time.monotonic() + 5
    while True:
        shown = httpx.get(f"{limited.url}/admin/keys/{key_id}", headers=ADMIN).json()
        if shown["spend"]["cost_usd"]["total"] == pytest.approx(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert shown["spend"]["cost_usd"]["total"] == pytest.approx(expected)
    assert shown["budget"]["spent_usd"] == pytest.approx(expected)
    # The lease and the reservation (4096 default tokens' worth) were given back:
    # five more streams fit under max_concurrent_streams = 5.
    for _ in range(5):
        assert chat(secret, limited.url, model="slow", background=True).status_code == 202


def test_a_stream_carries_its_cost_in_the_usage_chunk(server):
    _, secret = create_key(server.url)
    chunks = list(
        client(server, secret).chat.completions.create(
            model="fox", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage
    assert usage.model_extra["cost_usd"] == pytest.approx(fox_cost(usage.prompt_tokens, usage.completion_tokens))


def test_a_budget_stops_the_key_after_the_request_that_spent_it(limited):
    key_id, secret = create_key(limited.url, max_budget_usd=0.001, budget_period="month")
    ok = client(limited, secret)
    first = ok.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    assert first.usage.completion_tokens * FOX_OUTPUT / 1e6 > 0.001  # this one spent it
    with pytest.raises(openai.RateLimitError) as caught:
        ok.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    assert caught.value.code == "insufficient_quota"
    assert "budget" in caught.value.message
    shown = httpx.get(f"{limited.url}/admin/keys/{key_id}", headers=ADMIN).json()
    assert shown["budget"]["remaining_usd"] == 0 and shown["budget"]["spent_usd"] > 0.001
    # Raising the budget lets it through again.
    httpx.patch(f"{limited.url}/admin/keys/{key_id}", json={"max_budget_usd": 1.0}, headers=ADMIN).raise_for_status()
    assert chat(secret, limited.url).status_code == 200


def test_usage_is_broken_down_by_key(server):
    first, one = create_key(server.url, identity="alice")
    second, two = create_key(server.url, identity="alice")
    for secret, times in ((one, 1), (two, 2)):
        for _ in range(times):
            chat(secret, server.url).raise_for_status()
    server.wait_for(lambda: server.runtime.sessions.live_count == 0)
    deadline = time.monotonic() + 5
    while True:
        usage = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {one}"}).json()
        if usage["totals"]["sessions"] == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {k: v["sessions"] for k, v in usage["by_key"].items()} == {first: 1, second: 2}
    assert usage["by_key"][second]["cost_usd"] == pytest.approx(2 * usage["by_key"][first]["cost_usd"])


# -- privacy -------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_sessions_and_usage_and_another_keys_session_is_404(server):
    _, alice = create_key(server.url, identity="alice", team="eng")
    _, bob = create_key(server.url, identity="bob", team="eng")
    _, lead = create_key(server.url, identity="carol", team="eng", role="team_admin")
    _, other = create_key(server.url, identity="dave", team="ops")
    r = chat(alice, server.url, background=True)
    session_id = r.json()["id"]
    assert r.json()["identity"] == "alice" and r.json()["team"] == "eng"
    chat(bob, server.url).raise_for_status()
    chat(other, server.url).raise_for_status()

    def get(secret: str, path: str, method: str = "GET") -> httpx.Response:
        return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {secret}"})

    for path, method in ((f"/v1/sessions/{session_id}", "GET"), (f"/v1/sessions/{session_id}/stream", "GET"),
                         (f"/v1/sessions/{session_id}/completion", "GET"), (f"/v1/sessions/{session_id}/stop", "POST"),
                         (f"/v1/sessions/{session_id}", "DELETE")):
        refused = get(bob, path, method)
        assert refused.status_code == 404, (path, refused.text)
        never = "sess_000000000000000000000000"
        assert refused.json()["error"]["message"] == get(bob, f"/v1/sessions/{never}").json()["error"]["message"].replace(never, session_id)
    assert get(alice, f"/v1/sessions/{session_id}").status_code == 200
    assert get(lead, f"/v1/sessions/{session_id}").status_code == 200  # the team's admin
    assert get(other, f"/v1/sessions/{session_id}").status_code == 404

    def identities(secret: str) -> set[str]:
        return {s["identity"] for s in get(secret, "/v1/sessions?limit=100").json()["data"]}

    assert identities(alice) == {"alice"}
    assert identities(lead) == {"alice", "bob"}
    assert httpx.get(f"{server.url}/v1/sessions", headers=ADMIN).status_code == 200
    assert get(alice, "/v1/sessions?identity=bob").json()["data"] == []

    def usage_identities(secret: str | None) -> set[str]:
        headers = ADMIN if secret is None else {"Authorization": f"Bearer {secret}"}
        deadline = time.monotonic() + 5
        while True:
            body = httpx.get(f"{server.url}/v1/usage", headers=headers).json()
            if body["totals"]["sessions"] or time.monotonic() > deadline:
                return set(body["by_identity"])
            time.sleep(0.05)

    server.wait_for(lambda: server.runtime.sessions.live_count == 0)
    time.sleep(0.5)  # the store's writer: a session reaches the database within 250 ms
    assert usage_identities(alice) == {"alice"}
    assert usage_identities(lead) == {"alice", "bob"}
    assert usage_identities(None) >= {"alice", "bob", "dave"}


# -- the CLI -------------------------------------------------------------------------------


def test_the_cli_creates_lists_shows_rotates_and_revokes_keys_in_the_store(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text(keys_toml(f"sqlite:///{tmp_path / 'store.db'}"))

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "streamvisor.core.cli", "keys", "--config", str(config), *args],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cli("create", "--identity", "erin", "--name", "laptop", "--rpm", "7", "--models", "fox,echo")
    secret = out.split("secret (shown once; keep it now): ")[1].strip()
    key_id = json.loads(out.split("\n\nsecret")[0])["id"]
    assert secret.startswith("sk-sv-")
    assert key_id in cli("list") and "erin" in cli("list")
    shown = json.loads(cli("show", key_id))
    assert shown["rpm_limit"] == 7 and shown["models"] == ["fox", "echo"] and "secret" not in shown

    # A server on the same store accepts the key; the CLI's revocation ends it.
    server = ServerThread(make_config(config.read_text(), source=str(config))).start()
    try:
        assert chat(secret, server.url).status_code == 200
        rotated = cli("rotate", key_id).split("the old one no longer works): ")[1].strip()
        cli("revoke", key_id)
        time.sleep(5.1)  # without Redis, a server trusts a key it read for cache_seconds (5)
        assert chat(rotated, server.url).status_code == 401
        assert chat(secret, server.url).status_code == 401
    finally:
        server.stop()
    assert "revoked" in cli("list", "--all") and key_id not in cli("list")


# -- two processes sharing Redis -------------------------------------------------------------


def redis_reachable() -> bool:
    try:
        with closing(socket.create_connection(("127.0.0.1", 6379), timeout=1)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis() -> None:
    if not redis_reachable():
        if CI:
            pytest.fail("Redis is not reachable at 127.0.0.1:6379, and CI must run the shared-limit tests")
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")


@contextmanager
def two_processes(tmp_path: Path, keys: str, store_url: str | None = None) -> Iterator[list[str]]:
    config = tmp_path / "plugins.toml"
    config.write_text('[server]\nport = 0\nlog_level = "info"\n' + keys_toml(store_url or f"sqlite:///{tmp_path / 'store.db'}", keys))
    procs = []
    try:
        urls = []
        for _ in range(2):
            proc, url = serve_process(config)
            procs.append(proc)
            urls.append(url)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)


def test_rpm_10_across_two_processes_sharing_redis_lets_exactly_10_of_20_through(redis, store_url, tmp_path):
    # Both stores: the processes share the keys through SQLite's file, or
    # through PostgreSQL, as instances on several machines would.
    prefix = f"test-keys-{uuid.uuid4().hex[:8]}:"
    with two_processes(tmp_path, f'redis_url = "{REDIS}"\nkey_prefix = "{prefix}"', store_url) as (a, b):
        _, secret = create_key(a, rpm_limit=10)
        results: list[int] = []
        lock = threading.Lock()

        def send(url: str) -> None:
            status = chat(secret, url).status_code
            with lock:
                results.append(status)

        threads = [threading.Thread(target=send, args=(a if i % 2 else b,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [200] * 10 + [429] * 10


def test_a_revoked_key_is_refused_on_the_next_request_on_every_instance(redis, tmp_path):
    prefix = f"test-keys-{uuid.uuid4().hex[:8]}:"
    with two_processes(tmp_path, f'redis_url = "{REDIS}"\nkey_prefix = "{prefix}"\ncache_seconds = 600') as (a, b):
        key_id, secret = create_key(a)
        # Both instances have read the key and trust it for 10 minutes...
        for url in (a, b):
            assert chat(secret, url).status_code == 200
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        httpx.delete(f"{a}/admin/keys/{key_id}", headers=ADMIN).raise_for_status()
        # ...yet the revocation reaches both at once, on chat and on every route.
        for url in (b, a):
            assert chat(secret, url).status_code == 401
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_limits_survive_redis_forgetting_its_scripts_and_a_wrong_password_is_reported(redis, tmp_path):
    prefix = f"test-keys-{uuid.uuid4().hex[:8]}:"
    with keyed_server(tmp_path, f'redis_url = "{REDIS}"\nkey_prefix = "{prefix}"') as server:
        _, secret = create_key(server.url, rpm_limit=10)
        assert chat(secret, server.url).headers["x-ratelimit-remaining-requests"] == "9"
        with closing(socket.create_connection(("127.0.0.1", 6379), timeout=2)) as sock:
            sock.sendall(b"SCRIPT FLUSH\r\n")
            assert sock.recv(16).startswith(b"+OK")  # as after a Redis restart
        assert chat(secret, server.url).headers["x-ratelimit-remaining-requests"] == "8"
    folder = tmp_path / "wrong"
    folder.mkdir()
    with keyed_server(folder, f'redis_url = "redis://:not-the-password@127.0.0.1:6379/0"\nkey_prefix = "{prefix}"', extra="[plugins.health]") as server:
        _, secret = create_key(server.url, rpm_limit=10)
        refused = chat(secret, server.url)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
        check = next(c for c in httpx.get(f"{server.url}/health/ready").json()["checks"] if c["name"] == "keys:limits")
        assert check["ok"] is False and "refused the connection" in check["detail"]["redis"]


def test_when_redis_is_down_closed_refuses_and_open_admits_and_readiness_says_so(tmp_path):
    down = f"redis://127.0.0.1:{closed_port()}/0"
    for mode, expected in (("closed", 503), ("open", 200)):
        folder = tmp_path / mode
        folder.mkdir()
        with keyed_server(folder, f'redis_url = "{down}"\non_redis_error = "{mode}"\nredis_timeout = 0.1', extra="[plugins.health]") as server:
            _, secret = create_key(server.url, rpm_limit=100)
            r = chat(secret, server.url)
            assert r.status_code == expected, r.text
            if mode == "closed":
                assert r.json()["error"]["code"] == "limits_unavailable" and r.headers["Retry-After"]
            ready = httpx.get(f"{server.url}/health/ready").json()
            check = next(c for c in ready["checks"] if c["name"] == "keys:limits")
            assert check["ok"] is (mode == "open")
            assert check["detail"]["on_redis_error"] == mode


def test_a_stream_cut_by_a_crash_is_charged_to_its_key_after_the_restart(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text('[server]\nport = 0\nlog_level = "info"\n' + keys_toml(f"sqlite:///{tmp_path / 'store.db'}", "interrupted_scan_seconds = 0.2"))
    proc, url = serve_process(config)
    try:
        key_id, secret = create_key(url)
        seen: list[str] = []

        def read() -> None:
            try:
                with httpx.stream(
                    "POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                    json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}, timeout=10,
                ) as response:
                    seen.append(response.headers["X-Session-ID"])
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            seen.append(line)
            except httpx.HTTPError:
                pass  # the server died under it

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while len(seen) < 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.6)  # the store writes what a stream produced within 250 ms
        proc.send_signal(signal.SIGKILL)
        reader.join(timeout=10)
        session_id = seen[0]
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # The restarted server recovers the sessions of its instance name (host and
    # port): it listens on the port of the one that was killed.
    config.write_text(config.read_text().replace("port = 0", f"port = {url.rsplit(':', 1)[1]}", 1))
    proc, url = serve_process(config)
    try:
        deadline = time.monotonic() + 10
        while True:
            key = httpx.get(f"{url}/admin/keys/{key_id}", headers=ADMIN).json()
            if key["spend"]["cost_usd"]["total"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        session = httpx.get(f"{url}/v1/sessions/{session_id}", headers=ADMIN).json()
        assert session["state"] == "interrupted" and session["key_id"] == key_id
        usage = session["usage"]
        assert usage["completion_tokens"] >= 40
        assert key["spend"]["cost_usd"]["total"] == pytest.approx(fox_cost(usage["prompt_tokens"], usage["completion_tokens"]))
        assert key["spend"]["requests"]["total"] == 1
        # Once: a later scan (every 0.2 s here) does not charge it again.
        time.sleep(0.6)
        again = httpx.get(f"{url}/admin/keys/{key_id}", headers=ADMIN).json()
        assert again["spend"]["cost_usd"]["total"] == key["spend"]["cost_usd"]["total"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
