"""`streamvisor serve --workers N`: one supervisor, N worker processes on one
port. Real processes on loopback; which worker holds a connection is read from
/proc (the server's end of each connection is a socket in one worker's file
descriptors), so the HTTP API gains nothing for the tests' sake."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import SCRIPTED

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads processes and connections from Linux's /proc")

STREAMVISOR = [sys.executable, "-m", "streamvisor.core.cli"]
LISTENING = re.compile(r"listening on (http://\S+)")
GRACE = 2.0
FOX = "The quick brown fox jumps over the lazy dog."


class Group:
    """`streamvisor serve --workers N --port 0` in a child process, its output
    read by a thread."""

    def __init__(self, tmp_path: Path, workers: int = 2, toml: str = SCRIPTED) -> None:
        config = tmp_path / "plugins.toml"
        config.write_text(f"[server]\nshutdown_grace_seconds = {GRACE}\n" + toml)
        self.proc = subprocess.Popen(
            [*STREAMVISOR, "serve", "--workers", str(workers), "--port", "0", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        self.lines: list[str] = []
        self.url = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            found = LISTENING.search(line)
            if found and not self.url:
                self.url = found.group(1)

    def wait_listening(self, timeout: float = 30) -> "Group":
        deadline = time.monotonic() + timeout
        while not self.url:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the group did not come up:\n" + self.output
            time.sleep(0.02)
        return self

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def workers(self) -> dict[int, int]:
        return workers_of(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(GRACE + 10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._reader.join(5)
        return status


def workers_of(parent: int) -> dict[int, int]:
    """Worker index -> pid of the live worker processes whose parent is `parent`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and b"--worker-index" in argv:
            found[int(argv[argv.index(b"--worker-index") + 1])] = int(entry)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def connections_held(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to `port` each process holds the
    server's end of: the sockets of /proc/net/tcp found among its descriptors."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    held = {}
    for pid in pids:
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
            except OSError:
                pass
        held[pid] = count
    return held


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


def test_two_workers_serve_one_port_and_the_group_says_listening_once(tmp_path):
    group = Group(tmp_path).wait_listening()
    clients = [openai.OpenAI(base_url=group.url + "/v1", api_key="unused", max_retries=0) for _ in range(40)]
    try:
        workers = group.workers()
        assert sorted(workers) == [1, 2]

        def ask(client: openai.OpenAI) -> str | None:
            return client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, clients)) == [FOX] * 40
        # Each client keeps its one connection open (keep-alive): the worker
        # holding the server's end of it is the one that answered on it.
        held = connections_held(group.port, list(workers.values()))
        assert sum(held.values()) == 40 and all(held.values()), held
    finally:
        for client in clients:
            client.close()
        assert group.stop() == 0
    assert len(LISTENING.findall(group.output)) == 1, group.output
    assert re.search(r"listening on http://127\.0\.0\.1:\d+ \(2 workers, models: fox, slow, ", group.output)
    # Nothing here shares sessions: start-up says so, once.
    assert group.output.count("with 2 workers, some state is per worker. Sessions: each worker has its own") == 1


def test_a_worker_killed_with_9_comes_back_and_workers_do_not_outlive_their_supervisor(tmp_path):
    group = Group(tmp_path).wait_listening()
    try:
        before = group.workers()
        os.kill(before[1], signal.SIGKILL)
        with httpx.Client(base_url=group.url, timeout=10, headers={"Connection": "close"}) as http:
            for _ in range(10):
                r = http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == FOX
        wait_for(lambda: group.workers().get(1) not in (None, before[1]), 5, "worker 1 came back with a new pid")
        assert group.workers()[2] == before[2]
        wait_for(lambda: "worker 1 serves again" in group.output, 5, "worker 1 served again")
        assert re.search(rf"worker 1 \(pid {before[1]}\) was killed by SIGKILL: restarting it", group.output)
        # kill -9 of the supervisor: each worker reads the end of its line to it and shuts down.
        workers = list(group.workers().values())
        group.proc.kill()
        group.proc.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), GRACE + 3, "no worker outlived the supervisor")
    finally:
        group.stop()


def test_sigterm_stops_the_group_within_the_grace_period_during_a_stream(tmp_path):
    group = Group(tmp_path).wait_listening()
    client = openai.OpenAI(base_url=group.url + "/v1", api_key="unused", max_retries=0)
    try:
        workers = list(group.workers().values())
        stream = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = iter(stream)
        for _ in range(5):
            next(chunks)
        sent = time.monotonic()
        group.proc.send_signal(signal.SIGTERM)
        finish = None
        # The stream is not cut: it ends at once with its stopped chunk.
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "stopped"
        assert group.proc.wait(GRACE + 5) == 0
        took = time.monotonic() - sent
        assert took < GRACE + 1.5, took  # the grace period, and processes ending
        assert not any(alive(pid) for pid in workers)
    finally:
        client.close()
        group.stop()
    assert "received SIGTERM: stopping 2 workers" in group.output
    assert "killing it" not in group.output


def test_a_worker_that_keeps_dying_stops_the_group(tmp_path):
    group = Group(tmp_path).wait_listening()
    try:
        pid = group.workers()[1]
        for exits in range(1, 7):
            os.kill(pid, signal.SIGKILL)
            if exits == 6:
                break
            wait_for(lambda: group.workers().get(1) not in (None, pid), 10, f"worker 1 came back after exit {exits}")
            pid = group.workers()[1]
        assert group.proc.wait(GRACE + 10) == 1
    finally:
        group.stop()
    assert re.search(r"worker 1 \(pid \d+\) was killed by SIGKILL, 6 exits within 60 s \(more than 5 restarts\): stopping the group", group.output)
    assert len(LISTENING.findall(group.output)) == 1


def test_a_worker_that_cannot_start_stops_the_group_with_its_error(tmp_path):
    # The supervisor reads the file; the workers load the plugins it names.
    config = tmp_path / "plugins.toml"
    config.write_text("[plugins.nosuch]\n")
    result = subprocess.run(
        [*STREAMVISOR, "serve", "--workers", "2", "--port", "0", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "nosuch" in result.stderr
    assert "while the group was starting: stopping" in result.stderr
    assert not LISTENING.search(result.stderr)


def test_workers_must_be_one_or_more():
    result = subprocess.run([*STREAMVISOR, "serve", "--workers", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "argument --workers: expected a whole number of worker processes, 1 or more; found '0'" in result.stderr
