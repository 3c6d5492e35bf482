"""Security as a caller sees it, against real servers on loopback: the admin
key, ids that cannot inject headers or log lines, errors that show no internals,
the loopback default, what is open to everyone, and upstream secrets that never
come back out. docs/security.md is the threat model these tests hold to."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streamvisor.config import ServerSettings, load_config
from streamvisor.core.cli import build_config, parser
from streamvisor.core.logs import CONSOLE_FORMAT, JSONLinesFormatter
from streamvisor.hooks import ADMIN_KEY_ENV, Delta, ModelInfo, hookimpl, log_context
from streamvisor.testing import FakeUpstream, Reply, closed_port, sse

from .conftest import SCRIPTED, start_server

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "sv-admin-7f3c9e1d2b"
ADMIN_TOML = SCRIPTED + "\n[plugins.cache]\n[plugins.admin]\n"
ADMIN_ROUTES = [
    ("GET", "/admin/status"),
    ("GET", "/admin/sessions/status"),
    ("POST", "/admin/sessions/cleanup"),
    ("GET", "/admin/plugins"),
    ("GET", "/admin/cache/status"),
    ("POST", "/admin/cache/invalidate"),
]
#: What would give away the server's insides if it showed in a response.
INTERNALS = ("Traceback", 'File "', ".py", "/work/", "site-packages")
FRESH_ID = re.compile(r"^[0-9a-f]{32}$")


def _chat(model="fox", stream=False, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": stream, **extra}


def _seen(response):
    """Everything a client receives: status line, headers and body."""
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    return f"{response.status_code}\n{headers}\n\n{response.text}"


def _lines(records):
    """Each record as the console and JSON handlers of `streamvisor serve` write it."""
    console, jsonl = logging.Formatter(CONSOLE_FORMAT), JSONLinesFormatter()
    return [(record, console.format(record), jsonl.format(record)) for record in records]


def _raw_get(url, path, *header_lines):
    """GET `path` over a plain socket with exactly these header lines (bytes),
    which no HTTP client library would send; the status and the response head."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = b"GET " + path + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    request += b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    status = int(head.split(" ", 2)[1])
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers


# -- the admin key --------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_server():
    # The key is read from the environment at each request, so one server serves
    # every test here whatever each test sets.
    with start_server(ADMIN_TOML, session_retention_seconds=60) as server:
        yield server


def _admin_call(http, method, path, headers=None, params=None):
    # The POST routes get a body they would act on: a refusal must be why nothing happened.
    body = {"all": True} if path == "/admin/cache/invalidate" else {}
    if method == "POST":
        return http.post(path, json=body, headers=headers, params=params)
    return http.get(path, headers=headers, params=params)


def test_admin_routes_take_the_key_only_as_a_bearer_token(admin_server, monkeypatch):
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    http = admin_server.http()
    # A cached answer and a retained session: a refused cleanup or invalidate
    # that did its work anyway would remove them.
    cacheable = _chat(temperature=0)
    first = http.post("/v1/chat/completions", json=cacheable)
    assert http.post("/v1/chat/completions", json=cacheable).headers["X-Cache"] == "hit"
    session_id = first.headers["X-Session-ID"]

    refused = {
        "no key": {},
        "a wrong key": {"Authorization": "Bearer not-the-key"},
        "the key cut short": {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"},
        "the key and more": {"Authorization": f"Bearer {ADMIN_KEY}x"},
        "the key as Basic": {"Authorization": f"Basic {ADMIN_KEY}"},
        "the key as Token": {"Authorization": f"Token {ADMIN_KEY}"},
        "the key with no scheme": {"Authorization": ADMIN_KEY},
        "the key in X-API-Key": {"X-API-Key": ADMIN_KEY},
    }
    for method, path in ADMIN_ROUTES:
        for why, headers in refused.items():
            response = _admin_call(http, method, path, headers)
            assert response.status_code == 401, (path, why, response.text)
            assert response.json()["error"]["code"] == "invalid_admin_key"
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert ADMIN_KEY not in _seen(response)
        # The query string ends up in access logs and browser history: never read.
        for param in ("key", "api_key", "token", "access_token"):
            response = _admin_call(http, method, path, params={param: ADMIN_KEY})
            assert response.status_code == 401, (path, param)
            assert ADMIN_KEY not in _seen(response)

    assert http.post("/v1/chat/completions", json=cacheable).headers["X-Cache"] == "hit"
    assert http.get(f"/v1/sessions/{session_id}").status_code == 200

    for method, path in ADMIN_ROUTES:
        response = _admin_call(http, method, path, {"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 200, (path, response.text)
        assert ADMIN_KEY not in _seen(response)
    # The right key did what the refused ones could not.
    assert http.post("/v1/chat/completions", json=cacheable).headers["X-Cache"] == "miss"
    assert http.get(f"/v1/sessions/{session_id}").status_code == 404


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_admin_routes_are_disabled_without_a_key_in_the_environment(admin_server, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(ADMIN_KEY_ENV, value)
    http = admin_server.http()
    # An empty bearer token must not match an empty key.
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer anything"}):
        for method, path in ADMIN_ROUTES:
            response = _admin_call(http, method, path, headers)
            assert response.status_code == 403, (path, headers, response.text)
            assert response.json()["error"]["code"] == "admin_disabled"


# -- ids cannot inject headers or log lines ----------------------------------------


def test_an_insane_request_id_is_replaced_never_echoed(admin_server):
    url = admin_server.url
    status, headers = _raw_get(url, b"/v1/models", b"X-Request-ID: client-id-1")
    assert status == 200 and headers["x-request-id"] == ["client-id-1"]  # a sane id is kept

    for value in (
        b"abc\x01def",
        b"abc\x1b[2Jdef",  # a terminal escape
        b"abc\x7fdef",
        b"abc\tdef",
        b"abc def",
        b"abc\x85def",  # NEL, a line break to some log viewers
        "abc\u2028def".encode(),
        b"a" * 129,
    ):
        status, headers = _raw_get(url, b"/v1/models", b"X-Request-ID: " + value)
        assert status == 200, value
        (given,) = headers["x-request-id"]
        assert FRESH_ID.match(given), (value, given)

    # CR or LF cannot be inside a header value at all: the HTTP layer refuses
    # the request (a bare CR), or reads a bare LF as the end of the header line,
    # so what follows is a request header of its own. Either way nothing of it
    # comes back as a response header.
    for value in (b"abc\rX-Evil: 1", b"abc\nX-Evil: 1", b"abc\r\nX-Evil: 1", b"abc\n"):
        status, headers = _raw_get(url, b"/v1/models", b"X-Request-ID: " + value)
        assert status in (200, 400), value
        assert "x-evil" not in headers, value
        assert headers.get("x-request-id", ["abc"]) == ["abc"], value


def test_ids_in_paths_and_headers_cannot_forge_a_log_line(admin_server, caplog):
    http = admin_server.http()
    hostile = "/v1/sessions/abc%0D%0AX-Evil:%201"
    with caplog.at_level(logging.DEBUG):
        for method, path in (
            ("GET", hostile),
            ("POST", hostile + "/stop"),
            ("GET", "/v1/sessions/abc%1B[2J%C2%85%E2%80%A8x"),
            ("GET", "/nowhere%0D%0A2026-01-01 00:00:00,000 INFO    streamvisor.http forged"),
        ):
            response = http.request(method, path)
            assert response.status_code == 404, path
            body = response.json()
            assert set(body) == {"error", "request_id", "timestamp"} and body["error"]["code"] == "not_found"
            assert "x-evil" not in {name.lower() for name in response.headers}
        http.get("/v1/models", headers={"X-Request-ID": "abc\tinjected"})

    written = _lines(caplog.records)
    assert any("X-Evil" in console for _, console, _ in written), "the requests were not logged"
    for record, console, jsonl in written:
        assert not any(c in console for c in "\r\n\x1b\x85\u2028"), console
        assert "\n" not in jsonl and "\r" not in jsonl
        assert "injected" not in record.request_id
    logged = [console for _, console, _ in written if "X-Evil" in console]
    assert any("abc\\r\\nX-Evil: 1" in line for line in logged), logged  # escaped, still readable


def test_ids_a_plugin_logs_under_cannot_break_a_line_either(caplog):
    log = logging.getLogger("streamvisor.test")
    with caplog.at_level(logging.INFO), log_context("req\r\nforged", "sess\x1b[2J"):
        log.info("upstream said %s", "no\nINFO forged line")
    (record,) = [r for r in caplog.records if r.name == "streamvisor.test"]
    line = logging.Formatter(CONSOLE_FORMAT).format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "request_id=req\\r\\nforged session_id=sess\\x1b[2J upstream said no\\nINFO forged line" in line


# -- errors show no internals ------------------------------------------------------

SECRET = "secret detail from /work/main/plugins/leaky.py line 7"


class FaultyProvider:
    name = "faulty"

    async def list_models(self):
        return [ModelInfo("fails-at-once"), ModelInfo("fails-midway")]

    async def stream(self, request):
        if request.model == "fails-midway":
            yield Delta(content="partial ")
        raise Exception(SECRET)


class FaultyPlugin:
    @hookimpl
    def register_providers(self, register):
        register(FaultyProvider())

    @hookimpl
    def register_routes(self, register):
        async def crash():
            raise Exception(SECRET)

        register("/faulty/crash", crash)


def _assert_nothing_internal(response):
    seen = _seen(response)
    for leak in INTERNALS + (SECRET, "Exception"):
        assert leak not in seen, (leak, seen)


def test_no_error_shows_a_traceback_a_path_or_an_exception_message():
    toml = SCRIPTED + "\n[plugins.faulty]\n"
    with start_server(toml, plugins={"faulty": FaultyPlugin}, max_body_bytes=2048) as server, server.http() as http:
        post = "/v1/chat/completions"
        expected = [
            (http.post(post, content=b'{"model": "fox", "messages": [', headers={"Content-Type": "application/json"}), 400),
            (http.post(post, content=b"\xff\xfe not json"), 400),
            (http.post(post, json=[1, 2]), 400),
            (http.post(post, json={"model": 5, "messages": "hi"}), 400),
            (http.post(post, json=_chat(max_tokens="ten")), 400),
            (http.post(post, json=_chat(stream="yes")), 400),
            (http.post(post, json={"model": "fox", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}), 400),
            (http.post(post, json=_chat("gpt-17")), 404),
            (http.get("/no/such/route"), 404),
            (http.get(post), 405),
            (http.delete("/v1/models"), 405),
            (http.post(post, json=_chat(padding="x" * 4096)), 413),
            (http.post(post, json=_chat("fails-at-once")), 500),
            (http.post(post, json=_chat("fails-at-once", stream=True)), 500),
            (http.post(post, json=_chat("fails-midway")), 500),
            (http.get("/faulty/crash"), 500),
            (http.post(post, json=_chat("broken")), 502),
        ]
        for response, status in expected:
            assert response.status_code == status, (status, response.text)
            assert response.json()["error"]["message"]
            _assert_nothing_internal(response)

        # After the first chunk a failure is the stream's terminal error event.
        for model, message in (("fails-midway", "The stream failed unexpectedly."), ("breaks-midway", None)):
            response = http.post(post, json=_chat(model, stream=True))
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            error = events[-1]["error"]
            assert error["message"] and (message is None or error["message"] == message)
            _assert_nothing_internal(response)
            session = http.get(f"/v1/sessions/{response.headers['X-Session-ID']}")
            assert session.json()["error"]["message"] == error["message"]
            _assert_nothing_internal(session)


class GarbageProvider:
    """A provider bug: a delta whose content is not a string."""

    name = "garbage"

    async def list_models(self):
        return [ModelInfo("garbage")]

    async def stream(self, request):
        yield Delta(content=5)


class GarbagePlugin:
    @hookimpl
    def register_providers(self, register):
        register(GarbageProvider())


def test_no_request_and_no_provider_bug_can_stop_the_server():
    # Both used to raise out of the session's end and take the whole server
    # down: every later connection was refused.
    with start_server(SCRIPTED + "\n[plugins.garbage]\n", plugins={"garbage": GarbagePlugin}) as server, server.http() as http:
        part = {"model": "fox", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
        response = http.post("/v1/chat/completions", json=part)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].content[0].text"
        for body in (_chat("garbage"), _chat("garbage", stream=True)):
            http.post("/v1/chat/completions", json=body)
        reply = server.openai().chat.completions.create(**_chat())
        assert reply.choices[0].message.content == "The quick brown fox jumps over the lazy dog."


# -- binding -----------------------------------------------------------------------


def _listening(port):
    """The local addresses (hex, as /proc/net writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, _, hex_port = fields[1].rpartition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


def test_the_server_listens_on_loopback_unless_told_otherwise(tmp_path):
    assert ServerSettings().host == "127.0.0.1"
    assert load_config(ROOT / "plugins.toml").server.host == "127.0.0.1"
    assert build_config(parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9/v1"])).server.host == "127.0.0.1"
    config = tmp_path / "plugins.toml"
    config.write_text(SCRIPTED)
    assert build_config(parser().parse_args(["serve", "--config", str(config)])).server.host == "127.0.0.1"

    executable = Path(sys.executable).parent / "streamvisor"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "streamvisor.core.cli"]
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    proc = subprocess.Popen(
        [*command, "serve", "--config", str(config), "--port", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        found = re.search(r"listening on http://([^\s/]+):(\d+) ", lines[-1] if lines else "")
        assert found, "".join(lines)
        host, port = found.group(1), int(found.group(2))
        assert host == "127.0.0.1"
        if Path("/proc/net/tcp").exists():
            assert _listening(port) == ["0100007F"]  # 127.0.0.1, and no other address
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/v1/models").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, rest


# -- open routes --------------------------------------------------------------------


def test_usage_is_open_to_every_caller_while_there_are_no_api_keys():
    """Documents the current exposure (docs/security.md, "Who can reach what"):
    until API keys exist, /v1/usage shows everyone's usage to every caller. The
    API keys issue must change this test deliberately."""
    with start_server(SCRIPTED + "\n[plugins.usage]\n") as server:
        alice = server.openai(api_key="alice-key")
        reply = alice.chat.completions.with_raw_response.create(**_chat(), extra_headers={"X-Request-ID": "alice-request-1"})
        session_id = reply.headers["X-Session-ID"]
        with httpx.Client(base_url=server.url, timeout=10) as stranger:  # no Authorization at all
            # The usage listener records a session just after it ends.
            deadline = time.monotonic() + 5
            while (usage := stranger.get("/v1/usage").json())["totals"]["sessions"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            listed = stranger.get("/v1/usage/sessions").json()["data"]
            session = stranger.get(f"/v1/sessions/{session_id}")
    assert usage["totals"]["sessions"] == 1 and usage["totals"]["completion_tokens"] == 9
    assert list(usage["by_identity"]) == ["anonymous"]  # every caller is the same nobody
    assert [record["request_id"] for record in listed] == ["alice-request-1"]
    assert session.status_code == 200 and session.json()["request_id"] == "alice-request-1"


def test_a_session_id_alone_stops_a_stream():
    """Documents that POST /v1/sessions/{id}/stop needs nothing but the id: the
    ids are 96 random bits, unguessable, but anyone told one can stop it."""
    with start_server(SCRIPTED) as server, server.http() as owner, httpx.Client(base_url=server.url, timeout=10) as stranger:
        with owner.stream("POST", "/v1/chat/completions", json=_chat("slow", stream=True)) as response:
            session_id = response.headers["X-Session-ID"]
            assert re.fullmatch(r"sess_[0-9a-f]{24}", session_id)  # 24 hex digits: 96 bits
            stopped = stranger.post(f"/v1/sessions/{session_id}/stop")
            text = response.read().decode()
    assert stopped.status_code == 200 and stopped.json()["stopped"] is True
    assert '"finish_reason":"stopped"' in text


# -- secrets ----------------------------------------------------------------------

UPSTREAM_KEY = "sk-test-9c2f6e0b71d84a35"
HEADER_KEY = "azure-test-5d1e8b3f"


def test_upstream_keys_never_come_back_out(monkeypatch, caplog):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("TEST_UPSTREAM_HEADER_KEY", HEADER_KEY)
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    toml = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "echoing"
base_url = "{{url}}"
api_key = "${{TEST_UPSTREAM_KEY}}"
headers = {{ "api-key" = "${{TEST_UPSTREAM_HEADER_KEY}}" }}
models = ["m1"]

[[plugins.openai.upstreams]]
name = "gone"
base_url = "http://127.0.0.1:{closed_port()}/v1"
api_key = "${{TEST_UPSTREAM_KEY}}"
models = ["m2"]

[plugins.health]
[plugins.admin]
"""
    # An upstream that quotes back the credentials it was sent, as a naive
    # server or a proxy's error page may.
    quoted = f"Incorrect API key provided: {UPSTREAM_KEY} (api-key: {HEADER_KEY})"
    with FakeUpstream() as upstream:
        upstream.respond(401, json.dumps({"error": {"message": quoted}}).encode(), {"Content-Type": "application/json"})
        with caplog.at_level(logging.DEBUG), start_server(toml.replace("{url}", upstream.url)) as server, server.http() as http:
            seen = []
            for body in (_chat("m1"), _chat("m1", stream=True), _chat("m2")):
                response = http.post("/v1/chat/completions", json=body)
                assert response.status_code == 502, response.text
                seen.append(response)
            assert "***" in seen[0].json()["error"]["message"]  # the upstream's words, masked
            # Mid-stream, after the first chunk.
            upstream.queue(Reply(chunks=sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]}, {"error": {"message": quoted}})))
            midway = http.post("/v1/chat/completions", json=_chat("m1", stream=True))
            assert midway.status_code == 200 and "failed mid-stream" in midway.text
            seen.append(midway)
            for response in list(seen):
                seen.append(http.get(f"/v1/sessions/{response.headers['X-Session-ID']}"))
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            seen += [http.get(path, headers=admin) for path in ("/admin/status", "/admin/plugins", "/admin/sessions/status")]
            seen += [http.get(path) for path in ("/health", "/health/ready", "/v1/models")]
    assert upstream.seen_auth[0] == f"Bearer {UPSTREAM_KEY}"  # it was sent: the test has teeth
    for response in seen:
        assert UPSTREAM_KEY not in _seen(response) and HEADER_KEY not in _seen(response), _seen(response)
    for _, console, jsonl in _lines(caplog.records):
        assert UPSTREAM_KEY not in console and HEADER_KEY not in console, console
        assert UPSTREAM_KEY not in jsonl and HEADER_KEY not in jsonl


def test_the_redis_password_is_never_shown(monkeypatch, caplog):
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    # coredis takes the password from the user part or from ?password=.
    port = closed_port()
    url = f"redis://:pw-in-userinfo@127.0.0.1:{port}/0?password=pw-in-query&client_name=sv"
    toml = SCRIPTED + f'\n[plugins.cache]\nbackend = "redis"\nredis_url = "{url}"\nbackend_timeout_seconds = 0.2\n[plugins.health]\n[plugins.admin]\n'
    with caplog.at_level(logging.DEBUG), start_server(toml) as server, server.http() as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        status = http.get("/admin/cache/status", headers=admin)
        seen = [status, http.get("/admin/status", headers=admin), http.get("/health/ready"), http.post("/v1/chat/completions", json=_chat())]
    assert status.json()["redis_url"] == f"redis://:***@127.0.0.1:{port}/0?password=***&client_name=sv"
    for response in seen:
        assert "pw-in-" not in _seen(response), _seen(response)
    for _, console, jsonl in _lines(caplog.records):
        assert "pw-in-" not in console and "pw-in-" not in jsonl, console
