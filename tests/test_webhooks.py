"""The webhooks plugin: signed Standard Webhooks deliveries from the store's
outbox to a real receiver on loopback, retried on the schedule, surviving a
restart, delivered once among instances, and never sent where the SSRF guard
says no."""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from streamvisor.webhooks import WebhookVerificationError, generate_secret, sign, verify

from .conftest import SCRIPTED, ServerThread, make_config

ADMIN_KEY = "webhooks-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRET = generate_secret()


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)


class Receiver:
    """An HTTP server on 127.0.0.1 that answers POSTs with the statuses it is
    given (then 200), and keeps every request: headers and raw body."""

    def __init__(self, statuses: list[int] | None = None, headers: dict[int, dict[str, str]] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.extra = headers or {}
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.connections = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                for name, value in receiver.extra.get(status, {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self) -> Any:
                accepted = super().get_request()
                with receiver.lock:
                    receiver.connections += 1
                return accepted

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout: float = 15.0) -> list[tuple[dict[str, str], bytes, int]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            assert time.monotonic() < deadline, f"{len(self.requests)} deliveries, not {count}"
            time.sleep(0.02)


def toml(store: str, endpoint: str = "", settings: str = "", extra: str = "") -> str:
    return f"""
[plugins.webhooks]
poll_interval_seconds = 0.1
retry_schedule_seconds = [0.5, 0.5, 0.5]
jitter = 0
{settings}
{endpoint}

[plugins.store]
url = "{store}"
flush_interval_ms = 50
{extra}
{SCRIPTED}
"""


def endpoint(url: str, events: str = '["session.completed", "session.failed", "session.stopped", "session.interrupted"]', more: str = "allow_private = true") -> str:
    return f"""
[[plugins.webhooks.endpoints]]
id = "ep_receiver"
url = "{url}"
secret = "{SECRET}"
events = {events}
{more}
"""


def start(text: str) -> ServerThread:
    return ServerThread(make_config(text)).start()


def deliveries(server: ServerThread, endpoint_id: str = "ep_receiver", **params: Any) -> list[dict[str, Any]]:
    response = server.http().get(f"/admin/webhooks/{endpoint_id}/deliveries", headers=ADMIN, params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def wait_delivery(server: ServerThread, status: str, endpoint_id: str = "ep_receiver", timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(server, endpoint_id)
        if found and found[0]["status"] == status:
            return found[0]
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


# -- signatures ----------------------------------------------------------------------------


def test_verify_accepts_a_signed_body_and_refuses_a_tampered_or_old_one():
    body = b'{"type":"session.completed","data":{"session_id":"sess_1"}}'
    now = int(time.time())
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(now), "Webhook-Signature": sign(SECRET, "msg_1", now, body)}
    assert verify(body, headers, SECRET)["data"]["session_id"] == "sess_1"
    with pytest.raises(WebhookVerificationError):
        verify(body.replace(b"sess_1", b"sess_2"), headers, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(body, {**headers, "Webhook-Id": "msg_2"}, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, generate_secret())
    with pytest.raises(WebhookVerificationError, match="from now"):
        verify(body, headers, SECRET, now=now + 3600)
    # A rotation: the delivery carries both signatures; either secret verifies.
    old, new = SECRET, generate_secret()
    both = {**headers, "Webhook-Signature": f"{sign(new, 'msg_1', now, body)} {sign(old, 'msg_1', now, body)}"}
    assert verify(body, both, new) and verify(body, both, old) and verify(body, both, [generate_secret(), old])


@pytest.mark.parametrize(
    "address, blocked",
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"), ("172.16.5.5", "private"),
        ("169.254.169.254", "metadata"), ("169.254.10.10", "link-local"), ("100.64.0.1", "private"), ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"), ("::1", "loopback"), ("fd00::1", "private"), ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"), ("8.8.8.8", None), ("2606:4700:4700::1111", None),
    ],
)
def test_the_guard_refuses_private_addresses(address, blocked):
    from streamvisor.plugins.webhooks.guard import blocked_reason

    reason = blocked_reason(ipaddress.ip_address(address))
    assert (reason is None) if blocked is None else (blocked in reason)


# -- delivery ---------------------------------------------------------------------------------


def test_a_completed_session_is_delivered_signed_and_verifiable(tmp_path):
    with Receiver() as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url)))
        try:
            response = server.openai().chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": "a secret prompt"}])
            session_id = response.headers["x-session-id"]
            (headers, body, status), = receiver.wait(1)
            payload = verify(body, headers, SECRET)
            logged = wait_delivery(server, "delivered")
        finally:
            server.stop()
    assert payload["type"] == "session.completed"
    data = payload["data"]
    assert data["session_id"] == session_id and data["state"] == "completed" and data["model"] == "fox"
    assert data["usage"]["completion_tokens"] > 0 and data["finish_reason"] == "stop"
    assert "output" not in data and b"secret prompt" not in body and b"quick brown" not in body  # no content by default
    assert headers["webhook-id"] == "msg_" + session_id.removeprefix("sess_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30
    with pytest.raises(WebhookVerificationError):
        verify(body.replace(b"completed", b"failed!!!"), headers, SECRET)
    assert logged["id"] == headers["webhook-id"] and logged["attempt_count"] == 1
    assert logged["attempts"][0]["status"] == 200


def test_retries_keep_the_id_and_survive_a_restart_and_stop_after_the_2xx(tmp_path):
    store = f"sqlite:///{tmp_path}/s.db"
    with Receiver([500, 500, 200]) as receiver:
        # A schedule long enough for the restart to fall between two attempts.
        text = toml(store, endpoint(receiver.url)).replace("retry_schedule_seconds = [0.5, 0.5, 0.5]", "retry_schedule_seconds = [1.5, 1.5, 1.5]")
        server = start(text)
        try:
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            receiver.wait(1)
        finally:
            server.stop()
        assert len(receiver.requests) == 1
        server = start(text)
        try:
            got = receiver.wait(3, timeout=20)
            logged = wait_delivery(server, "delivered")
            time.sleep(2.0)  # past the next slot of the schedule: nothing more comes
            assert len(receiver.requests) == 3
        finally:
            server.stop()
    assert [status for _, _, status in got] == [500, 500, 200]
    assert len({headers["webhook-id"] for headers, _, _ in got}) == 1
    for headers, body, _ in got:
        verify(body, headers, SECRET)
    assert logged["attempt_count"] == 3 and [a["status"] for a in logged["attempts"]] == [500, 500, 200]
    # The attempts came from two different processes' runs of the same server.
    assert logged["attempts"][0]["at"] < logged["attempts"][2]["at"]


def test_retry_after_is_honoured_and_a_410_disables_the_endpoint(tmp_path):
    with Receiver([503, 410], headers={503: {"Retry-After": "2"}}) as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url)))
        try:
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            got = receiver.wait(2, timeout=20)
            wait_delivery(server, "endpoint_disabled")
            shown = server.http().get("/admin/webhooks/ep_receiver", headers=ADMIN).json()
            # Disabled: the next session's end is not even queued for it.
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "again"}])
            time.sleep(1.0)
            assert len(receiver.requests) == 2
            assert len(deliveries(server)) == 1
        finally:
            server.stop()
    first, second = (json.loads(got[0][1]), json.loads(got[1][1]))
    assert first == second
    assert shown["enabled"] is False and "410" in shown["disabled_reason"]
    assert "secret" not in shown and shown["secret_hint"].startswith("whsec_")


def test_retry_after_sets_the_next_attempt(tmp_path):
    with Receiver([503], headers={503: {"Retry-After": "2"}}) as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url)))
        try:
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            receiver.wait(1)
            first = time.monotonic()
            receiver.wait(2, timeout=10)
            gap = time.monotonic() - first
        finally:
            server.stop()
    # The schedule says 0.5 s; the receiver asked for 2.
    assert gap >= 1.8


def test_a_url_resolving_to_loopback_is_refused_logged_and_never_called(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="streamvisor.webhooks")
    with Receiver() as receiver:
        # https, so only the resolved address can refuse it: localhost is 127.0.0.1.
        url = f"https://localhost:{receiver.port}/hook"
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(url, more="")))
        try:
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            logged = wait_delivery(server, "refused")
            http = server.http()
            # The admin API refuses such URLs at once.
            refused = [
                http.post("/admin/webhooks", headers=ADMIN, json={"url": url_, "events": ["session.completed"]})
                for url_ in ("https://127.0.0.1/hook", "https://[::1]/hook", "https://169.254.169.254/latest", f"http://example.com/hook")
            ]
            time.sleep(0.3)
        finally:
            server.stop()
        assert receiver.connections == 0 and receiver.requests == []
    assert "127.0.0.1" in logged["attempts"][0]["error"] and "loopback" in logged["attempts"][0]["error"]
    assert logged["attempts"][0]["status"] is None and logged["attempt_count"] == 1
    assert any("not sending" in r.getMessage() and "loopback" in r.getMessage() for r in caplog.records)
    for response in refused:
        assert response.status_code == 400 and response.json()["error"]["param"] == "url", response.text


def test_the_admin_api_manages_endpoints_tests_and_retries_by_hand(tmp_path):
    with Receiver() as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db"))
        try:
            http = server.http()
            created = http.post(
                "/admin/webhooks", headers=ADMIN,
                json={"url": receiver.url, "events": ["session.failed"], "allow_private": True, "description": "ops"},
            )
            assert created.status_code == 201, created.text
            endpoint_id, secret = created.json()["id"], created.json()["secret"]
            assert secret.startswith("whsec_")
            assert http.get("/admin/webhooks", headers=ADMIN).json()["data"][0]["id"] == endpoint_id
            # A completed session is not an event it asked for; a failed one is.
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            failed = http.post("/v1/chat/completions", json={"model": "breaks-midway", "messages": [{"role": "user", "content": "x"}], "stream": True})
            (headers, body, _), = receiver.wait(1)
            event = verify(body, headers, secret)
            assert event["type"] == "session.failed" and event["data"]["session_id"] == failed.headers["x-session-id"]
            assert event["data"]["error"]["message"]
            # By hand: the same delivery again, with the same id.
            message_id = headers["webhook-id"]
            wait_delivery(server, "delivered", endpoint_id)
            retried = http.post(f"/admin/webhooks/{endpoint_id}/deliveries/{message_id}/retry", headers=ADMIN)
            assert retried.status_code == 202, retried.text
            again = receiver.wait(2)[1]
            assert again[0]["webhook-id"] == message_id
            # A test event, then a rotation: signed with both secrets for a while.
            rotated = http.post(f"/admin/webhooks/{endpoint_id}/rotate", headers=ADMIN).json()
            assert http.post(f"/admin/webhooks/{endpoint_id}/test", headers=ADMIN).status_code == 202
            test_headers, test_body, _ = receiver.wait(3)[2]
            assert verify(test_body, test_headers, secret)["type"] == "webhook.test"
            assert verify(test_body, test_headers, rotated["secret"])["type"] == "webhook.test"
            assert len(test_headers["webhook-signature"].split()) == 2
            # Changes are checked; unknown events and ids are clear errors.
            assert http.patch(f"/admin/webhooks/{endpoint_id}", headers=ADMIN, json={"events": ["session.exploded"]}).status_code == 400
            assert http.patch(f"/admin/webhooks/{endpoint_id}", headers=ADMIN, json={"enabled": False}).json()["enabled"] is False
            assert http.get("/admin/webhooks/ep_nope", headers=ADMIN).status_code == 404
            assert http.get(f"/admin/webhooks/{endpoint_id}/deliveries/msg_nope", headers=ADMIN).status_code == 404
            assert http.get("/admin/webhooks").status_code == 401
            assert http.delete(f"/admin/webhooks/{endpoint_id}", headers=ADMIN).json()["deleted"] is True
            assert http.get(f"/admin/webhooks/{endpoint_id}", headers=ADMIN).status_code == 404
        finally:
            server.stop()


def test_a_circuit_opening_is_delivered(tmp_path):
    extra = """
[plugins.retry]
attempts = 1
[plugins.retry.circuit]
failures = 2
"""
    with Receiver() as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url, events='["upstream.circuit_opened"]'), extra=extra))
        try:
            http = server.http()
            for _ in range(2):
                http.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
            (headers, body, _), = receiver.wait(1)
            time.sleep(0.5)
        finally:
            server.stop()
    event = verify(body, headers, SECRET)
    assert event["type"] == "upstream.circuit_opened" and event["data"]["provider"] == "scripted"
    assert event["data"]["failures"] == 2
    assert len(receiver.requests) == 1


def test_each_event_is_delivered_once_among_instances(postgres_url):
    """Two servers on one PostgreSQL store, both dispatching: every session's
    end reaches the receiver exactly once."""
    with Receiver() as receiver:
        text = toml(postgres_url, endpoint(receiver.url))
        servers = [start(text), start(text)]
        try:
            ids = []
            for i in range(12):
                response = servers[i % 2].openai().chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": f"n{i}"}])
                ids.append(response.headers["x-session-id"])
            got = receiver.wait(12, timeout=20)
            time.sleep(1.0)
        finally:
            for server in servers:
                server.stop()
    assert len(receiver.requests) == 12
    delivered = sorted(json.loads(body)["data"]["session_id"] for _, body, _ in got)
    assert delivered == sorted(ids)


def test_a_key_passing_its_budget_is_delivered_once(tmp_path):
    """Each fox answer costs $0.0019 at these prices: the budget of $0.003 is
    passed by the second request, and announced once."""
    extra = """
[plugins.keys]
flush_seconds = 0.1
[plugins.pricing]
[plugins.pricing.prices.fox]
input = 100.0
output = 200.0
"""
    with Receiver() as receiver:
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url, events='["key.budget_exceeded"]'), extra=extra))
        try:
            http = server.http()
            created = http.post("/admin/keys", headers=ADMIN, json={"identity": "alice", "max_budget_usd": 0.003, "budget_period": "month"}).json()
            client = server.openai(api_key=created["secret"])
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "one"}])
            time.sleep(0.5)
            assert receiver.requests == []  # under the budget: nothing
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "two"}])
            (headers, body, _), = receiver.wait(1)
            time.sleep(0.5)
        finally:
            server.stop()
    event = verify(body, headers, SECRET)
    assert event["type"] == "key.budget_exceeded"
    data = event["data"]
    assert data["key_id"] == created["id"] and data["identity"] == "alice" and data["scope"] == "key"
    assert data["budget_usd"] == 0.003 and data["spent_usd"] == pytest.approx(0.0038) and data["budget_period"] == "month"
    assert len(receiver.requests) == 1


def test_an_endpoint_that_opts_in_gets_the_output_signed_with_its_previous_secret_too(tmp_path):
    old = generate_secret()
    with Receiver() as receiver:
        more = f'allow_private = true\ninclude_content = true\nprevious_secrets = ["{old}"]'
        server = start(toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url, more=more)))
        try:
            server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
            (headers, body, _), = receiver.wait(1)
        finally:
            server.stop()
    assert verify(body, headers, old) == verify(body, headers, SECRET)  # a receiver not yet told the new secret
    output = verify(body, headers, SECRET)["data"]["output"]
    assert output == {"content": "The quick brown fox jumps over the lazy dog.", "reasoning": None, "truncated": False}


def test_kill_9_neither_loses_nor_invents_a_sessions_event(tmp_path):
    """A server killed with -9 right after a session ended, and while another
    streamed: after the restart the receiver has exactly one event per session,
    and each says what the store says happened."""
    from .test_store import serve_process

    with Receiver() as receiver:
        config = tmp_path / "plugins.toml"
        config.write_text('[server]\nport = 0\nlog_level = "info"\n' + toml(f"sqlite:///{tmp_path}/s.db", endpoint(receiver.url)))
        proc, url = serve_process(config)
        try:
            live = httpx.post(f"{url}/v1/chat/completions", json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True})
            live_id = live.json()["id"]
            time.sleep(0.5)
            done = httpx.post(f"{url}/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "y"}]})
            done_id = done.headers["x-session-id"]
            # Past the store's write of its end (flush_interval_ms = 50), before
            # the dispatcher looks for it (0.3 s after a session's end).
            time.sleep(0.12)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        config.write_text(config.read_text().replace("port = 0", f"port = {url.rsplit(':', 1)[1]}", 1))
        proc, url = serve_process(config)
        try:
            receiver.wait(2, timeout=20)
            states = {i: httpx.get(f"{url}/v1/sessions/{i}").json()["state"] for i in (live_id, done_id)}
            time.sleep(1.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    events = {}
    for headers, body, _ in receiver.requests:
        event = verify(body, headers, SECRET)
        assert event["data"]["session_id"] not in events, "an event was sent twice"
        events[event["data"]["session_id"]] = event["type"]
    assert events == {live_id: "session.interrupted", done_id: "session.completed"}
    assert states == {live_id: "interrupted", done_id: "completed"}


@pytest.mark.parametrize(
    "table, complaint",
    [
        (endpoint("https://hooks.example.com/x", events='["session.exploded"]', more=""), "session.exploded"),
        (endpoint("http://hooks.example.com/x", more=""), "only https"),
        ("[[plugins.webhooks.endpoints]]\nurl = 'https://hooks.example.com/x'\nsecret = 'not-a-secret'\n", "whsec_"),
    ],
)
def test_a_bad_endpoint_in_plugins_toml_stops_start_up_saying_why(tmp_path, table, complaint):
    with pytest.raises(Exception) as caught:
        start(toml(f"sqlite:///{tmp_path}/s.db", table))
    text = repr(caught.value) + repr(caught.value.__cause__)
    assert complaint in text, text
