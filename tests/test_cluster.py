"""The cluster plugin with two real server processes, the machine's Redis and
PostgreSQL: stop, follow and read a session through the instance that does not
run it; kill -9 of an instance; one rate limit and one cache for both; and a
Redis of our own that goes away and comes back (degraded mode)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from .conftest import CI
from .test_keys import FOX_INPUT, FOX_OUTPUT, redis_reachable
from .test_responses import broken_at, text_of
from .test_store import MODELS, events

ADMIN_KEY = "cluster-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(autouse=True)
def admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)


@pytest.fixture
def redis() -> str:
    if not redis_reachable():
        if CI:
            pytest.fail("Redis is not reachable at 127.0.0.1:6379, and CI must run the cluster tests")
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


#: Beats that notice a dead instance in seconds, for the tests that do not wait for one.
FAST_BEATS = "beat_seconds = 0.5\ndead_after_seconds = 3"


def cluster_toml(store: str, redis_url: str, prefix: str, cluster: str = FAST_BEATS, extra: str = "") -> str:
    return f"""
[server]
port = 0
log_level = "info"
session_retention_seconds = 30
redis_url = "{redis_url}"

[plugins.cache]
key_prefix = "{prefix}cache:"

[plugins.store]
url = "{store}"

[plugins.cluster]
key_prefix = "{prefix}cluster:"
{cluster}

[plugins.usage]
[plugins.health]
{extra}
{MODELS}
"""


def serve_process(config: Path) -> tuple[subprocess.Popen, str]:
    """`streamvisor serve` on `config`; its output goes on to a log file beside
    the config (read it when a test fails)."""
    log = (config.parent / f"serve-{len(list(config.parent.glob('serve-*.log')))}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvisor.core.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=config.parent,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        log.write(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            def drain() -> None:
                for rest in proc.stdout:
                    log.write(rest)
                    log.flush()
                log.close()

            threading.Thread(target=drain, daemon=True).start()
            return proc, found.group(1)
        assert time.monotonic() < deadline
    raise AssertionError("serve did not start")


@contextmanager
def two_instances(tmp_path: Path, store: str, redis_url: str, cluster: str = FAST_BEATS, extra: str = "") -> Iterator[tuple[list[subprocess.Popen], list[str]]]:
    prefix = f"test-{secrets.token_hex(4)}:"
    config = tmp_path / "plugins.toml"
    config.write_text(cluster_toml(store, redis_url, prefix, cluster, extra.replace("{prefix}", prefix)))
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        for _ in range(2):
            proc, url = serve_process(config)
            procs.append(proc)
            urls.append(url)
        wait_for_members(urls[0], 2)
        yield procs, urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_members(url: str, count: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{url}/admin/cluster", headers=ADMIN).json()
        if len(body["members"]) == count:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def background(url: str, model: str = "slow") -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}], "background": True})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_a_stream_started_on_a_is_stopped_through_b_and_ends_stopped_on_a(postgres_url, redis, tmp_path):
    with two_instances(tmp_path, postgres_url, redis) as (_, (a, b)):
        client = openai.OpenAI(base_url=f"{a}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.with_streaming_response.create(
            model="slow", messages=[{"role": "user", "content": "go"}], stream=True
        )
        with stream as response:
            session_id = response.headers["X-Session-ID"]
            chunks = response.parse()
            seen = []
            stopped_at = None
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    seen.append(chunk.choices[0].delta.content)
                if len(seen) == 5 and stopped_at is None:
                    r = httpx.post(f"{b}/v1/sessions/{session_id}/stop")
                    stopped_at = len(seen)
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert body["delivered"] is True and body["stopped"] is True
                    assert body["state"] == "stopped" and body["id"] == session_id
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        assert finish == "stopped"
        assert stopped_at is not None
        # Both instances tell the same story; B asks A.
        assert httpx.get(f"{b}/v1/sessions/{session_id}").json()["state"] == "stopped"
        completion = httpx.get(f"{b}/v1/sessions/{session_id}/completion").json()
        assert completion["choices"][0]["finish_reason"] == "stopped"
        assert completion["choices"][0]["message"]["content"].startswith("".join(seen))
        # A stop of a session nobody has is a 404 on either.
        assert httpx.post(f"{b}/v1/sessions/sess_{'0' * 24}/stop").status_code == 404


def test_a_background_stream_started_on_a_is_followed_from_b_with_last_event_id_without_gap_or_duplicate(postgres_url, redis, tmp_path):
    with two_instances(tmp_path, postgres_url, redis) as (_, (a, b)):
        session_id = background(a, "count")
        # Follow from B, drop the connection after a few chunks, resume with Last-Event-ID.
        got: list[tuple[int, str]] = []
        with httpx.stream("GET", f"{b}/v1/sessions/{session_id}/stream", timeout=10) as response:
            assert response.status_code == 200
            buffer = ""
            for text in response.iter_text():
                buffer += text
                complete = buffer.rsplit("\n\n", 1)[0]
                parsed = [(i, d) for i, d in events(complete) if i is not None]
                if len(parsed) >= 6:
                    got = parsed[:6]
                    break
        last = got[-1][0]
        r = httpx.get(f"{b}/v1/sessions/{session_id}/stream", headers={"Last-Event-ID": str(last)}, timeout=20)
        rest = events(r.text)
        ids = [i for i, _ in got] + [i for i, _ in rest if i is not None]
        assert ids == list(range(len(ids))), ids  # no gap, no duplicate
        text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for _, d in got + rest if d != "[DONE]" and json.loads(d).get("choices"))
        assert text == "w00 w01 w02 w03 w04 w05 w06 w07 w08 w09 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 w26 w27 w28 w29"
        assert rest[-1][1] == "[DONE]"
        # The same ids as on A itself.
        on_a = [i for i, _ in events(httpx.get(f"{a}/v1/sessions/{session_id}/stream", timeout=20).text) if i is not None]
        assert on_a == ids


def test_kill_9_of_a_marks_its_session_interrupted_through_b_within_15_s_with_usage_once(postgres_url, redis, tmp_path):
    keys = f"""
[plugins.keys]
key_prefix = "{{prefix}}keys:"
lease_seconds = 3
interrupted_scan_seconds = 1
[plugins.pricing]
[plugins.pricing.prices.slow]
input = {FOX_INPUT}
output = {FOX_OUTPUT}
[plugins.pricing.prices.fox]
input = {FOX_INPUT}
output = {FOX_OUTPUT}
"""
    # The default beats: 2 s, dead after 10 s.
    with two_instances(tmp_path, postgres_url, redis, cluster="", extra=keys) as (procs, (a, b)):
        r = httpx.post(f"{a}/admin/keys", headers=ADMIN, json={"name": "one", "identity": "one", "max_concurrent_streams": 1})
        key_id, auth = r.json()["id"], {"Authorization": f"Bearer {r.json()['secret']}"}
        fox = {"model": "fox", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{a}/v1/chat/completions", headers=auth, json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "background": True})
        assert r.status_code == 202, r.text
        session_id = r.json()["id"]
        # Its one concurrent stream is taken, through either instance.
        assert httpx.post(f"{b}/v1/chat/completions", headers=auth, json=fox).status_code == 429
        # A follower on B sees chunks live, then the end.
        follower: dict = {}

        def follow() -> None:
            r = httpx.get(f"{b}/v1/sessions/{session_id}/stream", headers=auth, timeout=30)
            follower["events"] = events(r.text)

        thread = threading.Thread(target=follow)
        thread.start()
        time.sleep(1.0)
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=10)
        deadline = killed + 15
        # Until it is marked, B still answers for it: from what A published.
        assert httpx.get(f"{b}/v1/sessions/{session_id}", headers=auth).status_code == 200
        freed = None
        while True:
            if freed is None and httpx.post(f"{b}/v1/chat/completions", headers=auth, json=fox).status_code == 200:
                freed = time.monotonic() - killed  # the dead instance's lease expired
            stored = httpx.get(f"{b}/v1/sessions", params={"state": "interrupted"}, headers=ADMIN).json()["data"]
            if any(s["id"] == session_id for s in stored):
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        marked_after = time.monotonic() - killed
        assert marked_after < 15
        assert freed is not None and freed < marked_after  # lease_seconds (3) is shorter than the beats' 10 s
        thread.join(timeout=30)
        got = follower["events"]
        assert len(got) > 10, got[:3]
        ids = [i for i, _ in got if i is not None]
        assert ids == list(range(len(ids)))
        error = json.loads(got[-1][1])["error"]
        assert error["code"] == "session_interrupted"
        # The usage ledger has it exactly once.
        records = httpx.get(f"{b}/v1/usage/sessions", params={"limit": 100}, headers=ADMIN).json()["data"]
        mine = [r for r in records if r["session_id"] == session_id]
        assert len(mine) == 1 and mine[0]["outcome"] == "interrupted" and mine[0]["completion_tokens"] > 0
        # And its key is charged for it once (the keys plugin's scan runs every second here).
        deadline = time.monotonic() + 10
        previous = None
        while True:
            spend = httpx.get(f"{b}/admin/keys/{key_id}", headers=ADMIN).json()["spend"]
            # Two reads alike: not in the middle of a flush, which adds the
            # amounts one (kind, period) at a time.
            if (spend["requests"]["total"] >= 2 and spend == previous) or time.monotonic() > deadline:
                break
            previous = spend
            time.sleep(0.3)
        time.sleep(2.5)
        again = httpx.get(f"{b}/admin/keys/{key_id}", headers=ADMIN).json()["spend"]
        assert again == spend and spend["requests"]["total"] == 2  # the interrupted stream and the one after
        assert spend["cost_usd"]["total"] > 0
        # B lists itself alone now, and says whom it reaped.
        cluster = wait_for_members(b, 1, timeout=15)
        assert any(r["sessions"] == 1 for r in cluster["reaped"])


def test_rpm_across_both_instances_holds_as_one_limit_and_a_cache_entry_from_a_is_a_hit_on_b(postgres_url, redis, tmp_path):
    keys = f"""
[plugins.keys]
key_prefix = "{{prefix}}keys:"
[plugins.pricing]
[plugins.pricing.prices.fox]
input = {FOX_INPUT}
output = {FOX_OUTPUT}
"""
    # keys before store in plugins.toml order does not matter for this test
    with two_instances(tmp_path, postgres_url, redis, extra=keys) as (_, (a, b)):
        r = httpx.post(f"{a}/admin/keys", headers=ADMIN, json={"name": "ci", "identity": "ci", "rpm_limit": 6})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "fox", "messages": [{"role": "user", "content": "same question"}], "temperature": 0}
        statuses, caches, sessions = [], [], []
        for i in range(12):
            r = httpx.post(f"{(a, b)[i % 2]}/v1/chat/completions", headers=auth, json=body)
            statuses.append(r.status_code)
            caches.append(r.headers.get("X-Cache"))
            sessions.append(r.headers.get("X-Session-ID"))
        assert statuses.count(200) == 6 and statuses.count(429) == 6, statuses
        # The first answer (through A) was stored; B's first request was a hit.
        assert caches[0] == "miss" and caches[1] == "hit", caches
        # Through B, A's session is its key's to read, and nobody else's.
        r = httpx.post(f"{a}/admin/keys", headers=ADMIN, json={"name": "other", "identity": "other"})
        other = {"Authorization": f"Bearer {r.json()['secret']}"}
        assert httpx.get(f"{b}/v1/sessions/{sessions[0]}", headers=auth).json()["identity"] == "ci"
        hidden = httpx.get(f"{b}/v1/sessions/{sessions[0]}", headers=other)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        assert httpx.post(f"{b}/v1/sessions/{sessions[0]}/stop", headers=other).status_code == 404


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def own_redis(port: int) -> Iterator[subprocess.Popen]:
    binary = shutil.which("redis-server")
    if binary is None:
        if CI:
            pytest.fail("redis-server is not installed, and CI must run the degraded-mode test")
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with closing(socket.create_connection(("127.0.0.1", port), timeout=0.5)):
                break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_when_redis_goes_away_each_instance_serves_its_own_readiness_says_degraded_and_it_rejoins(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    store = f"sqlite:///{tmp_path / 'store.db'}"
    with own_redis(port) as server:
        with two_instances(tmp_path, store, url) as (_, (a, b)):
            server.terminate()
            server.wait(timeout=10)
            # Each keeps serving its own sessions.
            for base in (a, b):
                r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                session_id = r.headers["X-Session-ID"]
                assert httpx.get(f"{base}/v1/sessions/{session_id}").json()["state"] == "completed"
            deadline = time.monotonic() + 10
            while True:
                ready = httpx.get(f"{a}/health/ready")
                check = next(c for c in ready.json()["checks"] if c["name"] == "cluster:redis")
                if check["detail"]["redis"] != "ok":
                    break
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert ready.status_code == 200 and check["ok"] is True
            assert "serves its own sessions" in check["detail"]["degraded"]
            # Redis comes back (empty): both rejoin without a restart.
            with own_redis(port):
                body = wait_for_members(a, 2, timeout=20)
                assert {m["id"] for m in body["members"]} == {m["id"] for m in wait_for_members(b, 2)["members"]}
                # Readiness says so too, on both, once each has subscribed again.
                for base in (a, b):
                    deadline = time.monotonic() + 10
                    while next(c for c in httpx.get(f"{base}/health/ready").json()["checks"] if c["name"] == "cluster:redis")["detail"]["redis"] != "ok":
                        assert time.monotonic() < deadline
                        time.sleep(0.1)
                session_id = background(a, "count")
                time.sleep(0.1)
                r = httpx.post(f"{b}/v1/sessions/{session_id}/stop")
                assert r.status_code == 200 and r.json()["delivered"] is True


def test_a_plain_stream_on_a_is_followed_from_b_on_demand_and_deleted_through_b(postgres_url, redis, tmp_path):
    with two_instances(tmp_path, postgres_url, redis) as (_, (a, b)):
        # Not background: nothing is published until a follower on B asks A.
        with httpx.stream(
            "POST", f"{a}/v1/chat/completions", json={"model": "count", "messages": [{"role": "user", "content": "x"}], "stream": True}, timeout=20
        ) as own:
            session_id = own.headers["X-Session-ID"]
            followed = httpx.get(f"{b}/v1/sessions/{session_id}/stream", timeout=20)
            original = own.read().decode()
        theirs = [(i, d) for i, d in events(followed.text) if i is not None]
        assert theirs, (followed.text, [p.read_text()[-2000:] for p in sorted(tmp_path.glob("serve-*.log"))])
        mine = [(i, d) for i, d in events(original) if i is not None]
        assert [i for i, _ in theirs] == [i for i, _ in mine] == list(range(len(mine)))
        assert [json.loads(d)["choices"] for _, d in theirs] == [json.loads(d)["choices"] for _, d in mine]
        # Finished, its buffer let go on A: a follower on B gets it from the store, whole.
        again = [(i, d) for i, d in events(httpx.get(f"{b}/v1/sessions/{session_id}/stream", timeout=20).text) if i is not None]
        assert again == theirs
        # Another caller's view goes through A too; deleting through B deletes it everywhere.
        assert httpx.delete(f"{b}/v1/sessions/{session_id}").json()["deleted"] is True
        assert httpx.get(f"{a}/v1/sessions/{session_id}").status_code == 410
        assert httpx.get(f"{b}/v1/sessions/{session_id}").status_code == 410


def test_workers_of_one_serve_share_sessions_through_the_cluster(postgres_url, redis, tmp_path):
    """`serve --workers 2` with the cluster plugin: whichever worker the kernel
    gives a request to, every session can be read and stopped."""
    prefix = f"test-{secrets.token_hex(4)}:"
    config = tmp_path / "plugins.toml"
    config.write_text(cluster_toml(postgres_url, redis, prefix))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvisor.core.cli", "serve", "--config", str(config), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        output = []
        for line in proc.stdout:
            output.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                url = found.group(1)
                threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError("serve --workers 2 did not start:\n" + "".join(output[-40:]))
        members = wait_for_members(url, 2)["members"]
        assert sorted(m["name"].rsplit("/", 1)[1] for m in members) == ["w1", "w2"]
        # New connections each time: the kernel spreads them over both workers.
        ids = [background(url) for _ in range(12)]
        # With 12 of them spread over two workers, some stops reached the worker
        # that did not run the session (all of them landing on its owner has a
        # chance of 1 in 4,096): delivered, and stopped, all the same.
        for session_id in ids:
            r = httpx.post(f"{url}/v1/sessions/{session_id}/stop")
            assert r.status_code == 200 and r.json()["delivered"] is True and r.json()["state"] == "stopped", r.text
        assert all(httpx.get(f"{url}/v1/sessions/{session_id}").json()["state"] == "stopped" for session_id in ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# -- behind nginx, with the configuration docs/scaling.md gives ------------------------------


def documented_nginx(upstreams: list[str], port: int, folder: Path) -> Path:
    """docs/scaling.md's nginx block, with these instances and this port, in a
    whole nginx.conf that keeps every file under `folder`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", text, re.S)
    assert block, "docs/scaling.md has no nginx block"
    site = block.group(1)
    servers = "".join(f"    server {u.removeprefix('http://')};\n" for u in upstreams)
    site = re.sub(r"(upstream streamvisor \{\n)(?:    server .*;\n)+", lambda m: m.group(1) + servers, site)
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    assert f"listen 127.0.0.1:{port};" in site and servers in site
    temp = folder / "temp"
    temp.mkdir()
    conf = folder / "nginx.conf"
    conf.write_text(
        f"daemon off;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\nworker_processes 1;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {temp}/body;\n proxy_temp_path {temp}/proxy;\n"
        f" fastcgi_temp_path {temp}/fastcgi;\n uwsgi_temp_path {temp}/uwsgi;\n scgi_temp_path {temp}/scgi;\n{site}\n}}\n"
    )
    return conf


def test_behind_the_documented_nginx_streams_arrive_live_and_any_session_is_stopped(postgres_url, redis, tmp_path):
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        if CI:
            pytest.fail("nginx is not installed (.ci/run installs nginx-light), and CI must test the documented config")
        pytest.skip("nginx is not installed")
    with two_instances(tmp_path, postgres_url, redis) as (_, urls):
        port = free_port()
        folder = tmp_path / "nginx"
        folder.mkdir()
        conf = documented_nginx(urls, port, folder)
        nginx = subprocess.Popen([binary, "-c", str(conf), "-p", str(folder)], stderr=subprocess.PIPE, text=True)
        try:
            front = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    if httpx.get(f"{front}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert nginx.poll() is None, nginx.stderr.read() if nginx.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
            for _ in range(4):  # round robin: streams on both instances
                with client.chat.completions.with_streaming_response.create(
                    model="slow", messages=[{"role": "user", "content": "go"}], stream=True
                ) as response:
                    session_id = response.headers["X-Session-ID"]
                    seen = 0
                    finish = None
                    for chunk in response.parse():
                        # A model that never ends on its own: chunks arriving at all
                        # means nginx does not buffer the stream.
                        if chunk.choices and chunk.choices[0].delta.content:
                            seen += 1
                            if seen == 3:
                                r = httpx.post(f"{front}/v1/sessions/{session_id}/stop")
                                assert r.status_code == 200 and r.json()["delivered"] is True, r.text
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    assert finish == "stopped" and seen >= 3
            # A background session followed through nginx, from wherever it lands.
            session_id = background(front, "count")
            followed = httpx.get(f"{front}/v1/sessions/{session_id}/stream", timeout=20)
            ids = [i for i, _ in events(followed.text) if i is not None]
            assert ids == list(range(len(ids))) and len(ids) > 30
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


def test_a_background_response_started_on_a_is_resumed_from_b_after_a_sequence_number(postgres_url, redis, tmp_path):
    with two_instances(tmp_path, postgres_url, redis, extra="[plugins.responses]") as (_, (a, b)):
        with openai.OpenAI(base_url=f"{a}/v1", api_key="unused", max_retries=0) as on_a, openai.OpenAI(
            base_url=f"{b}/v1", api_key="unused", max_retries=0
        ) as on_b:
            first = broken_at(on_a, 10, model="count", input="count")
            response_id = first[0].response.id
            rest = list(on_b.responses.retrieve(response_id, stream=True, starting_after=10))
            numbers = [e.sequence_number for e in first + rest]
            assert numbers == list(range(len(numbers)))
            text = text_of(first + rest)
            assert text == " ".join(f"w{i:02d}" for i in range(30)) and rest[-1].type == "response.completed"
            assert on_b.responses.retrieve(response_id).output_text == text
            # Cancelled through B, while it runs on A.
            slow = on_a.responses.create(model="slow", input="go", background=True)
            time.sleep(0.3)
            assert on_b.responses.cancel(slow.id).status == "cancelled"
            assert on_a.responses.retrieve(slow.id).status == "cancelled"
