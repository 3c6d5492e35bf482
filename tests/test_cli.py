"""The `streamvisor` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import SCRIPTED, require_local_model, start_server

ROOT = Path(__file__).resolve().parent.parent
STREAMVISOR = [sys.executable, "-m", "streamvisor.core.cli"]


def run(*args, cwd=ROOT, timeout=120, env=None):
    return subprocess.run([*STREAMVISOR, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


class ServeProcess:
    """`streamvisor serve` in a child process; the URL is read from its log."""

    def __init__(self, *args, cwd=ROOT, env=None, timeout=180):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*STREAMVISOR, "serve", "--port", "0", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                return
            if time.monotonic() > deadline:
                break
        self.stop()
        raise AssertionError("serve did not come up:\n" + "".join(self.lines))

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.lines.append(rest or "")
        return self.proc.returncode


def test_plugins_lists_loaded_plugins_with_versions_and_hooks():
    result = run("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "from", "contract", "hooks"]
    assert re.match(r"local\s+0\.1\.0\s+built-in\s+1\.0\s+register_providers, startup$", lines[1])
    names = [line.split()[0] for line in lines[1:-2]]
    assert names == ["local", "reasoning", "cache", "retry", "pricing", "responses", "webhooks", "files", "store", "console", "usage", "monitor", "health", "admin"]
    assert re.search(r"^store\s+0\.1\.0\s+built-in\s+1\.5\s+.*register_store", result.stdout, re.M)
    assert re.search(r"^pricing\s+0\.1\.0\s+built-in\s+1\.2\s+.*register_pricing", result.stdout, re.M)
    assert re.search(r"^monitor\s+0\.1\.0\s+built-in\s+1\.0\s+.*on_event.*register_routes", result.stdout, re.M)
    assert lines[-2] == "disabled in plugins.toml: openai, scripted, router, keys, cluster, otel"
    assert lines[-1] == "this streamvisor implements plugin contract 1.6"


def test_chat_streams_a_completion_to_the_terminal(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text(SCRIPTED)
    result = run("chat", "hello there", "-c", str(config), "-m", "echo", "--usage")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello there\n"
    assert "[echo: 2 prompt + 2 completion tokens, finish_reason=stop]" in result.stderr
    failed = run("chat", "x", "-c", str(config), "-m", "broken")
    assert failed.returncode == 1 and "error: scripted failure" in failed.stderr
    missing = run("chat", "x", "-c", str(config), "-m", "nope")
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_chat_against_a_running_server():
    with start_server(SCRIPTED) as server:
        result = run("chat", "ignored", "--url", server.base, "-m", "fox")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The quick brown fox jumps over the lazy dog.\n"


def test_serve_upstream_needs_no_config_file(tmp_path):
    with start_server(SCRIPTED) as upstream:
        env = {**os.environ, "MY_KEY": "sk-abc"}
        serve = ServeProcess("--upstream", upstream.base, "--api-key-env", "MY_KEY", cwd=tmp_path, env=env)
        try:
            client = openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0)
            with client:
                assert {"fox", "echo"} <= {m.id for m in client.models.list()}
                stream = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "x"}], stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in stream) == "The quick brown fox jumps over the lazy dog."
                # The default operational stack runs without a config file too.
                for _ in range(2):
                    raw = client.chat.completions.with_raw_response.create(
                        model="fox", messages=[{"role": "user", "content": "x"}], temperature=0
                    )
                assert raw.headers["X-Cache"] == "hit"
                metrics = httpx.get(serve.url + "/metrics").text
                assert "streamvisor_sessions_total" in metrics
                assert httpx.get(serve.url + "/health").status_code == 200
                assert httpx.get(serve.url + "/v1/usage").json()
        finally:
            code = serve.stop()
    assert code == 0, "".join(serve.lines)
    assert any("shutting down" in line for line in serve.lines)


def test_serve_without_any_config_says_what_it_needs(tmp_path):
    result = run("serve", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "plugins.toml" in result.stderr and "--upstream" in result.stderr


@pytest.mark.local_model
def test_first_start_assembles_the_model_with_progress_then_serves(tmp_path):
    require_local_model()
    env = {**os.environ, "STREAMVISOR_CACHE": str(tmp_path / "cache")}
    serve = ServeProcess(env=env)
    try:
        log = "".join(serve.lines)
        assert len(re.findall(r"assembling the packaged model: \d+% \(\d+/241 MiB\)", log)) >= 8
        assert "assembling the packaged model: 100%" in log
        assert re.search(r"model 'gemma-3-270m' ready in", log)
        assert "(models: gemma-3-270m, local)" in log
        with openai.OpenAI(base_url=serve.url + "/v1", api_key="x", max_retries=0) as client:
            reply = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
            assert reply.usage.completion_tokens >= 1
    finally:
        assert serve.stop() == 0
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"]


def test_json_logs_carry_the_request_and_session_ids(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text('[server]\nlog_format = "json"\n' + SCRIPTED + "\n[plugins.monitor]\n")
    serve = ServeProcess("--config", str(config), cwd=tmp_path)
    try:
        with httpx.Client(base_url=serve.url) as http:
            reply = http.post(
                "/v1/chat/completions",
                json={"model": "fox", "messages": [{"role": "user", "content": "x"}]},
                headers={"X-Request-ID": "json-log-1"},
            )
            session_id = reply.headers["X-Session-ID"]
            time.sleep(0.3)  # the monitor's line is written by its listener task
    finally:
        assert serve.stop() == 0
    import json as _json

    entries = [_json.loads(line) for line in "".join(serve.lines).splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "message", "request_id", "session_id"} <= set(e) for e in entries)
    mine = [e for e in entries if e["request_id"] == "json-log-1"]
    assert any(e["logger"] == "streamvisor.http" and "200" in e["message"] for e in mine)
    assert any(e["session_id"] == session_id and e["logger"] == "streamvisor.monitor" for e in mine)


def test_sigterm_does_not_wait_for_idle_keep_alive_connections(tmp_path):
    """A client (a load balancer, say) that keeps an idle connection open must
    not hold a stopping server for its whole grace period (hypercorn_patch)."""
    import http.client
    import threading

    config = tmp_path / "plugins.toml"
    config.write_text('[server]\nport = 0\nshutdown_grace_seconds = 20\n[plugins.scripted]\n')
    proc = subprocess.Popen([sys.executable, "-m", "streamvisor.core.cli", "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if found:
                break
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        connections = []
        for _ in range(3):
            conn = http.client.HTTPConnection(found.group(1), int(found.group(2)), timeout=30)
            conn.request("GET", "/v1/models")
            assert conn.getresponse().read()
            connections.append(conn)  # kept open, idle
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # Far from the 20 s grace: the idle connections were closed, not waited for.
        assert time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
