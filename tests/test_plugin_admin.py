"""The admin plugin against real servers: the admin key, the status page with
every plugin's panels, session status and cleanup, plugin error and fault
counts, and the watchdog. (Liveness and readiness: test_plugin_health.py.)"""

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


def _service(runtime, plugin, name):
    """A service's supervisor stats (call it in the server's loop)."""
    return next(p for p in runtime.plugin_status() if p["name"] == plugin)["services"][name]


def _listener_errors(server, plugin="raiser"):
    return next(s.errors for s in server.runtime.events.stats if s.plugin == plugin)


class Panels:
    """A third party's status panels: one async, one sync, one that raises and
    one that hangs."""

    @hookimpl
    def register_status_panels(self, register):
        async def totals():
            await trio.sleep(0)
            return {"sessions": 3, "total_tokens": 42}

        def queue():
            return {"backlog": 0}

        def broken():
            raise ValueError("panel bug")

        async def hanging():
            await trio.sleep_forever()

        register("totals", totals)
        register("queue", queue)
        register("broken", broken)
        register("hanging", hanging)


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


def test_admin_routes_need_the_key_and_are_disabled_without_one(monkeypatch, caplog):
    monkeypatch.delenv("STREAMVISOR_ADMIN_KEY", raising=False)
    caplog.set_level(logging.INFO, logger="streamvisor.plugins.admin")
    toml = SCRIPTED + "\n[plugins.panels]\n[plugins.usage]\n[plugins.admin]\npanel_timeout_seconds = 0.3\n"
    with start_server(toml, plugins={"panels": Panels()}) as server:
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

        server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: server.runtime.sessions.retained_count == 1)
        t0 = time.monotonic()
        status = _admin(server).get("/admin/status").json()
        elapsed = time.monotonic() - t0
        plugins = {p["name"]: p for p in _admin(server).get("/admin/plugins").json()["plugins"]}
    assert status["uptime_seconds"] >= 0
    assert status["sessions"] == {"live": 0, "retained": 1}
    assert status["providers"] == [{"name": "scripted", "models": ["fox", "slow", "echo", "broken", "breaks-midway"]}]
    assert "fox" in status["models"] and "slow" in status["models"]
    panels = status["panels"]
    # A third party's panels, shown without admin knowing them; the usage
    # plugin's totals the same way.
    assert panels["panels"]["totals"] == {"sessions": 3, "total_tokens": 42}
    assert panels["panels"]["queue"] == {"backlog": 0}
    assert panels["panels"]["broken"] == {"error": "ValueError: panel bug"}
    assert panels["panels"]["hanging"] == {"error": "no answer within 0.3 s"}
    assert elapsed < 5, "panels are gathered at once, each under its timeout"
    assert panels["usage"]["totals"]["totals"]["sessions"] == 1
    assert panels["usage"]["totals"]["totals"]["completion_tokens"] == 9
    # The panels that failed are faults of their plugin: two on each of the
    # two status pages asked for.
    faults = plugins["panels"]["faults"]
    assert faults["status panel"]["count"] == 4
    assert plugins["panels"]["errors"]["faults"] == 4


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
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
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
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
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
        server.wait_for(lambda: _service(server.runtime, "crasher", "flaky")["starts"] == 2)

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
    assert admin_plugin["origin"] == "built-in" and admin_plugin["version"] and admin_plugin["contract"] == "1.0"
    assert {"register_routes", "register_services", "startup"} <= set(admin_plugin["hooks"])
    assert admin_plugin["services"]["watchdog"]["running"] is True
    assert admin_plugin["errors"]["total"] == 0
    assert plugins["scripted"]["hooks"] == ["register_providers"]
    assert plugins["raiser"]["origin"] == "registered" and plugins["raiser"]["hooks"] == ["on_event"]
    assert plugins["raiser"]["contract"] is None  # it does not say which contract it was written for
    assert plugins["raiser"]["services"]["listener"]["running"] is True
    assert before >= 13 and after >= before + 13, "listener errors go up with every event"
    assert plugins["raiser"]["errors"]["total"] >= before
    flaky = plugins["crasher"]["services"]["flaky"]
    assert flaky["crashes"] == 1 and flaky["running"] is True
    assert flaky["last_error"] == "RuntimeError: flaky service broke"
    assert plugins["crasher"]["errors"]["service_crashes"] == 1
    # Without any panel, the status page has none.
    assert status["panels"] == {}


def test_watchdog_stops_sessions_older_than_max_session_seconds(caplog):
    caplog.set_level(logging.INFO, logger="streamvisor.plugins.admin")
    toml = SCRIPTED + """
[plugins.admin]
interval_seconds = 0.05
max_session_seconds = 0.5
"""
    with start_server(toml) as server:
        watchdog = server.call(lambda: _service(server.runtime, "admin", "watchdog"))
        assert watchdog["running"] and watchdog["starts"] == 1 and watchdog["crashes"] == 0
        t0 = time.monotonic()
        with server.http().stream("POST", "/v1/chat/completions", json=_chat("slow")) as response:
            session_id = response.headers["X-Session-ID"]
            chunks = list(_events(response.iter_lines()))  # slow would stream for 200 s
        elapsed = time.monotonic() - t0
        state = server.http().get(f"/v1/sessions/{session_id}").json()
        assert server.call(lambda: _service(server.runtime, "admin", "watchdog"))["running"]
        metrics = server.call(lambda: generate_latest(server.runtime.metrics)).decode()
    assert 'streamvisor_admin_ended_sessions_total{reason="stale"} 1.0' in metrics
    assert _finish_reasons(chunks) == ["stopped"]
    assert chunks[-1]["usage"]["completion_tokens"] > 1
    assert 0.5 <= elapsed < 10
    assert state["state"] == "stopped"
    assert any("watchdog: stopped session" in r.getMessage() and session_id in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "setting",
    ["interval_seconds = 0", "max_session_seconds = -1", "panel_timeout_seconds = -5", "idle_seconds = 'soon'"],
)
def test_bad_settings_stop_start_up(setting):
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config(f"[plugins.admin]\n{setting}\n"))
    assert "plugins.admin" in str(caught.value)

