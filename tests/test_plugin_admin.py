"""The admin plugin against real servers: the admin key, session status and
cleanup, plugin error counts, liveness and readiness (unreachable upstreams,
memory watermark, other plugins' checks), and the watchdog."""

from __future__ import annotations

import json
import logging
import time

import pytest
import trio
from prometheus_client import generate_latest

from streamvisor.config import ConfigError
from streamvisor.hooks import PluginHost, hookimpl

from .conftest import SCRIPTED, make_config, start_server
from .fakes import closed_port

KEY = "test-admin-key"
ADMIN_ROUTES = [
    ("GET", "/admin/status"),
    ("GET", "/admin/sessions/status"),
    ("POST", "/admin/sessions/cleanup"),
    ("GET", "/admin/plugins"),
]

STALLED = """
[[plugins.scripted.models]]
name = "stalled"
text = "one two three"
delay = 60
"""


def _admin(server, key=KEY):
    return server.http(headers={"Authorization": f"Bearer {key}"})


def _chat(model, stream=True):
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _events(lines):
    """The decoded `data:` payloads of an SSE line iterator, up to [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)


def _finish_reasons(chunks):
    return [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]


def _listener_errors(server, plugin="raiser"):
    return next(s.errors for s in server.runtime.events.stats if s.plugin == plugin)


class FakeUsage:
    """Stands in for the usage plugin: what /admin/status reads is its totals()."""

    @hookimpl
    def startup(self, runtime):
        pass

    async def totals(self):
        await trio.sleep(0)
        return {"sessions": 3, "total_tokens": 42}


class Raiser:
    @hookimpl
    def on_event(self, event):
        raise RuntimeError(f"listener bug on {event.type}")


class Crasher:
    """A service that crashes on its first run, then runs quietly."""

    def __init__(self):
        self.runs = 0

    @hookimpl
    def register_services(self, register):
        async def flaky():
            self.runs += 1
            if self.runs == 1:
                raise RuntimeError("flaky service broke")
            await trio.sleep_forever()

        register("flaky", flaky)


class Checks:
    """Another plugin's readiness checks: one passes, one raises, one hangs."""

    @hookimpl
    def register_health_checks(self, register):
        async def fine():
            return True

        async def broken():
            raise ConnectionError("backend gone")

        async def hanging():
            await trio.sleep_forever()

        register("fine", fine)
        register("broken", broken)
        register("hanging", hanging)


def test_admin_routes_need_the_key_and_are_disabled_without_one(monkeypatch, caplog):
    monkeypatch.delenv("STREAMVISOR_ADMIN_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="streamvisor.plugins.admin")
    toml = SCRIPTED + "\n[plugins.usage]\n[plugins.admin]\n"
    with start_server(toml, plugins={"usage": FakeUsage()}) as server:
        assert any(
            r.levelno == logging.WARNING and "disabled" in r.getMessage() and "STREAMVISOR_ADMIN_KEY" in r.getMessage()
            for r in caplog.records
        ), "the start-up warning says admin routes are disabled and how to enable them"
        http = server.http()
        for method, path in ADMIN_ROUTES:
            response = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "admin_disabled"

        monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
        for method, path in ADMIN_ROUTES:
            missing = http.request(method, path)
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "invalid_admin_key"
            wrong = http.request(method, path, headers={"Authorization": "Bearer not-the-key"})
            assert wrong.status_code == 401, path
            assert http.request(method, path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path

        status = _admin(server).get("/admin/status").json()
    assert status["uptime_seconds"] >= 0
    assert status["sessions"] == {"live": 0, "retained": 0}
    assert {p["name"] for p in status["providers"]} == {"scripted"}
    assert "fox" in status["models"] and "slow" in status["models"]
    assert status["usage"] == {"sessions": 3, "total_tokens": 42}


def test_sessions_status_lists_a_running_session_with_model_and_usage(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    with start_server(SCRIPTED + "\n[plugins.admin]\n") as server:
        with server.http().stream("POST", "/v1/chat/completions", json=_chat("slow")) as response:
            session_id = response.headers["X-Session-ID"]
            lines = response.iter_lines()
            chunks = [chunk for chunk, _ in zip(_events(lines), range(5))]
            assert len(chunks) == 5
            status = _admin(server).get("/admin/sessions/status").json()
        listed = {s["id"]: s for s in status["sessions"]}
        assert session_id in listed
        live = listed[session_id]
        assert live["state"] == "running"
        assert live["model"] == "slow" and live["provider"] == "scripted"
        assert live["identity"] == "anonymous"
        assert live["age_seconds"] > 0
        assert live["usage"]["completion_tokens"] >= 5
        assert status["counts"]["live"] == 1 and status["counts"]["listed"] == 1
        assert status["counts"]["truncated"] is False
        # The client went away: the session ends and is no longer listed as live.
        server.wait_for(lambda: server.runtime.sessions.live == 0)
        after = _admin(server).get("/admin/sessions/status").json()
    assert after["sessions"] == []
    assert after["counts"]["by_state"] == {"disconnected": 1}


def test_cleanup_cancels_idle_sessions_keeps_their_usage_and_removes_finished_ones(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    with start_server(SCRIPTED + STALLED + "\n[plugins.admin]\n", session_retention_seconds=60) as server:
        http, admin = server.http(), _admin(server)
        done = http.post("/v1/chat/completions", json=_chat("fox", stream=False))
        finished_id = done.headers["X-Session-ID"]
        with http.stream("POST", "/v1/chat/completions", json=_chat("stalled")) as stalled, server.http().stream(
            "POST", "/v1/chat/completions", json=_chat("slow")
        ) as busy:
            stalled_id, busy_id = stalled.headers["X-Session-ID"], busy.headers["X-Session-ID"]
            stalled_lines = stalled.iter_lines()
            first = next(_events(stalled_lines))
            assert first["choices"][0]["delta"]["content"] == "one"
            time.sleep(0.5)  # the stalled model waits 60 s before its second word
            cleanup = admin.post("/admin/sessions/cleanup", json={"idle_seconds": 0.3})
            assert cleanup.status_code == 200
            result = cleanup.json()
            # The stalled stream ends at once, as a stopped stream.
            rest = list(_events(stalled_lines))
        assert _finish_reasons(rest) == ["stopped"]
        assert rest[-1]["usage"]["completion_tokens"] == 1

        cancelled = {s["id"]: s for s in result["cancelled"]}
        removed = {s["id"]: s for s in result["removed"]}
        assert set(cancelled) == {stalled_id}, "only the idle session is cancelled, not the busy one"
        assert cancelled[stalled_id]["reason"] == "idle" and cancelled[stalled_id]["idle_seconds"] > 0.3
        assert cancelled[stalled_id]["state"] == "stopped"
        assert cancelled[stalled_id]["usage"]["completion_tokens"] == 1
        assert busy_id not in removed
        assert set(removed) == {finished_id} and removed[finished_id]["reason"] == "finished"
        assert removed[finished_id]["usage"]["completion_tokens"] == 9
        assert result["counts"] == {"cancelled": 1, "removed": 1}

        # The finished one is gone now; the cancelled one is kept with its usage.
        assert http.get(f"/v1/sessions/{finished_id}").status_code == 404
        kept = http.get(f"/v1/sessions/{stalled_id}").json()
        assert kept["state"] == "stopped" and kept["usage"]["completion_tokens"] == 1

        # The next cleanup removes what the first one stopped (and the busy
        # stream, which ended when its client left).
        server.wait_for(lambda: server.runtime.sessions.live == 0)
        again = admin.post("/admin/sessions/cleanup").json()
        assert {s["id"] for s in again["removed"]} == {stalled_id, busy_id}
        assert again["cancelled"] == []
        assert http.get(f"/v1/sessions/{stalled_id}").status_code == 404
        assert admin.post("/admin/sessions/cleanup", json={"idle_seconds": "soon"}).status_code == 400


def test_admin_plugins_lists_versions_hooks_and_error_counts(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    crasher = Crasher()
    toml = SCRIPTED + "\n[plugins.admin]\n[plugins.raiser]\n[plugins.crasher]\n"
    with start_server(toml, plugins={"raiser": Raiser(), "crasher": crasher}) as server:
        admin, client = _admin(server), server.openai()
        server.wait_for(lambda: server.runtime.supervisor.children["crasher:flaky"].starts == 2)

        def raiser_errors():
            plugins = {p["name"]: p for p in admin.get("/admin/plugins").json()["plugins"]}
            return plugins, plugins["raiser"]["errors"]["listener_errors"]

        client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: _listener_errors(server) >= 13)  # 14 events per fox session
        plugins, before = raiser_errors()
        client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: _listener_errors(server) >= 26)
        _, after = raiser_errors()
        status = admin.get("/admin/status").json()

    assert list(plugins) == ["scripted", "admin", "raiser", "crasher"]
    admin_plugin = plugins["admin"]
    assert admin_plugin["origin"] == "built-in" and admin_plugin["version"]
    assert {"register_routes", "register_services", "register_health_checks", "startup"} <= set(admin_plugin["hooks"])
    assert admin_plugin["services"]["watchdog"]["running"] is True
    assert admin_plugin["errors"]["total"] == 0
    assert plugins["scripted"]["hooks"] == ["register_providers"]
    assert plugins["raiser"]["origin"] == "registered" and plugins["raiser"]["hooks"] == ["on_event"]
    assert before >= 13 and after >= before + 13, "listener errors go up with every event"
    assert plugins["raiser"]["errors"]["total"] >= before
    flaky = plugins["crasher"]["services"]["flaky"]
    assert flaky["crashes"] == 1 and flaky["running"] is True
    assert flaky["last_error"] == "RuntimeError: flaky service broke"
    assert plugins["crasher"]["errors"]["service_crashes"] == 1
    # Without the usage plugin, the status says so instead of failing.
    assert status["usage"] is None and "not enabled" in status["usage_note"]


def test_readiness_names_an_unreachable_upstream_and_health_needs_no_key(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    toml = SCRIPTED + f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "dead"
base_url = "http://127.0.0.1:{closed_port()}/v1"
models = ["ghost"]
connect_timeout = 1

[plugins.admin]
probe_timeout_seconds = 3
check_timeout_seconds = 4
"""
    with start_server(toml) as server:
        http = server.http()
        live = http.get("/health")
        ready = http.get("/health/ready")
        # The unreachable upstream does not stop the others from serving.
        assert server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        metrics = server.call(lambda: generate_latest(server.runtime.metrics)).decode()
    assert 'streamvisor_watchdog_upstream_reachable{provider="dead"} 0.0' in metrics
    assert 'streamvisor_watchdog_upstream_reachable{provider="scripted"} 1.0' in metrics
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["admin:providers"]["ok"] is False
    providers = checks["admin:providers"]["detail"]["providers"]
    assert providers["dead"]["ok"] is False and providers["dead"]["method"] == "GET models"
    assert providers["scripted"]["ok"] is True
    assert checks["admin:memory"]["ok"] is True
    assert len(body["reasons"]) == 1
    assert "'dead'" in body["reasons"][0] and "ConnectError" in body["reasons"][0]


def test_readiness_is_200_when_every_upstream_answers_and_503_when_one_goes_away(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    with start_server(SCRIPTED, shutdown_grace_seconds=0.5) as upstream:
        toml = f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "peer"
base_url = "{upstream.base}"
models = ["fox"]
connect_timeout = 1

[plugins.admin]
interval_seconds = 0.1
probe_timeout_seconds = 2
"""
        with start_server(toml) as server:
            http = server.http()
            ready = http.get("/health/ready")
            assert ready.status_code == 200, ready.text
            body = ready.json()
            assert body["status"] == "ready" and body["reasons"] == []
            peer = next(c for c in body["checks"] if c["name"] == "admin:providers")["detail"]["providers"]["peer"]
            assert peer["ok"] is True and peer["method"] == "GET models" and peer["detail"] == "answered 200"
            status = _admin(server).get("/admin/status").json()
            assert status["providers"][0]["name"] == "peer" and status["providers"][0]["probe"]["ok"] is True

            upstream.stop()
            # The watchdog probes every 0.1 s; readiness follows within a few probes.
            deadline = time.monotonic() + 10
            while (ready := http.get("/health/ready")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
    assert ready.status_code == 503
    assert "'peer'" in ready.json()["reasons"][0]


def test_memory_watermark_and_other_plugins_checks_decide_readiness():
    toml = SCRIPTED + """
[plugins.checks]
[plugins.admin]
memory_watermark_mb = 1
check_timeout_seconds = 0.3
"""
    with start_server(toml, plugins={"checks": Checks()}) as server:
        t0 = time.monotonic()
        ready = server.http().get("/health/ready")
        elapsed = time.monotonic() - t0
    assert ready.status_code == 503
    checks = {c["name"]: c for c in ready.json()["checks"]}
    assert checks["checks:fine"]["ok"] is True
    assert checks["checks:broken"] == {**checks["checks:broken"], "ok": False, "detail": "raised ConnectionError: backend gone"}
    assert checks["checks:hanging"]["ok"] is False and "did not answer within 0.3 s" in checks["checks:hanging"]["detail"]
    assert checks["admin:memory"]["ok"] is False and checks["admin:memory"]["detail"]["rss_mb"] > 1
    assert checks["admin:providers"]["ok"] is True
    reasons = ready.json()["reasons"]
    assert len(reasons) == 3
    assert any(r.startswith("admin:memory: memory: RSS") and "watermark of 1 MiB" in r for r in reasons)
    assert elapsed < 10, "checks run under their timeout, all at once"


def test_watchdog_stops_sessions_older_than_max_session_seconds(caplog):
    caplog.set_level(logging.INFO, logger="streamvisor.plugins.admin")
    toml = SCRIPTED + """
[plugins.admin]
interval_seconds = 0.05
max_session_seconds = 0.5
"""
    with start_server(toml) as server:
        watchdog = server.call(lambda: server.runtime.supervisor.children["admin:watchdog"])
        assert watchdog.running and watchdog.starts == 1 and watchdog.crashes == 0
        t0 = time.monotonic()
        with server.http().stream("POST", "/v1/chat/completions", json=_chat("slow")) as response:
            session_id = response.headers["X-Session-ID"]
            chunks = list(_events(response.iter_lines()))  # slow would stream for 200 s
        elapsed = time.monotonic() - t0
        state = server.http().get(f"/v1/sessions/{session_id}").json()
        assert server.call(lambda: server.runtime.supervisor.children["admin:watchdog"].running)
        metrics = server.call(lambda: generate_latest(server.runtime.metrics)).decode()
    assert 'streamvisor_admin_ended_sessions_total{reason="stale"} 1.0' in metrics
    assert _finish_reasons(chunks) == ["stopped"]
    assert chunks[-1]["usage"]["completion_tokens"] > 1
    assert 0.5 <= elapsed < 10
    assert state["state"] == "stopped"
    assert any("watchdog: stopped session" in r.getMessage() and session_id in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "setting",
    ["interval_seconds = 0", "max_session_seconds = -1", "memory_watermark_mb = -5", "check_timeout_seconds = 'soon'"],
)
def test_bad_settings_stop_start_up(setting):
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config(f"[plugins.admin]\n{setting}\n"))
    assert "plugins.admin" in str(caught.value)

