"""The health plugin against real servers: liveness and readiness with no key,
unreachable upstreams named, the memory watermark, other plugins' checks, and
its probes shown on the admin status page."""

from __future__ import annotations

import time

import pytest
import trio
from prometheus_client import generate_latest

from streamvisor.config import ConfigError
from streamvisor.hooks import PluginHost, hookimpl
from streamvisor.testing import closed_port

from .conftest import SCRIPTED, make_config, start_server

KEY = "test-admin-key"


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


def test_readiness_names_an_unreachable_upstream_and_needs_no_key(monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", KEY)
    toml = SCRIPTED + f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "dead"
base_url = "http://127.0.0.1:{closed_port()}/v1"
models = ["ghost"]
connect_timeout = 1

[plugins.health]
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
    assert 'streamvisor_health_upstream_reachable{provider="dead"} 0.0' in metrics
    assert 'streamvisor_health_upstream_reachable{provider="scripted"} 1.0' in metrics
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["health:providers"]["ok"] is False
    providers = checks["health:providers"]["detail"]["providers"]
    assert providers["dead"]["ok"] is False and providers["dead"]["method"] == "GET models"
    assert providers["scripted"]["ok"] is True
    assert checks["health:memory"]["ok"] is True
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

[plugins.health]
interval_seconds = 0.1
probe_timeout_seconds = 2

[plugins.admin]
"""
        with start_server(toml) as server:
            http = server.http()
            ready = http.get("/health/ready")
            assert ready.status_code == 200, ready.text
            body = ready.json()
            assert body["status"] == "ready" and body["reasons"] == []
            peer = next(c for c in body["checks"] if c["name"] == "health:providers")["detail"]["providers"]["peer"]
            assert peer["ok"] is True and peer["method"] == "GET models" and peer["detail"] == "answered 200"
            # The probes are the health plugin's status panel, on the admin page.
            status = server.http(headers={"Authorization": f"Bearer {KEY}"}).get("/admin/status").json()
            assert status["panels"]["health"]["providers"]["providers"]["peer"]["ok"] is True
            assert status["panels"]["health"]["providers"]["rss_mb"] > 0

            upstream.stop()
            # The prober runs every 0.1 s; readiness follows within a few probes.
            deadline = time.monotonic() + 10
            while (ready := http.get("/health/ready")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
    assert ready.status_code == 503
    assert "'peer'" in ready.json()["reasons"][0]


def test_memory_watermark_and_other_plugins_checks_decide_readiness():
    toml = SCRIPTED + """
[plugins.checks]
[plugins.health]
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
    assert checks["health:memory"]["ok"] is False and checks["health:memory"]["detail"]["rss_mb"] > 1
    assert checks["health:providers"]["ok"] is True
    reasons = ready.json()["reasons"]
    assert len(reasons) == 3
    assert any(r.startswith("health:memory: memory: RSS") and "watermark of 1 MiB" in r for r in reasons)
    assert elapsed < 10, "checks run under their timeout, all at once"


@pytest.mark.parametrize(
    "setting",
    ["interval_seconds = 0", "probe_timeout_seconds = -1", "memory_watermark_mb = -5", "check_timeout_seconds = 'soon'"],
)
def test_bad_settings_stop_start_up(setting):
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config(f"[plugins.health]\n{setting}\n"))
    assert "plugins.health" in str(caught.value)
