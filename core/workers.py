"""`streamvisor serve --workers N`: N worker processes on one port, one supervisor.

The `serve` process binds the listening socket once (core/cli.py) and becomes
the supervisor: it starts N copies of `streamvisor serve` that inherit the
socket and serve it with hypercorn's trio worker (the kernel gives each new
connection to whichever worker accepts it first). The supervisor serves no
requests. It

- logs `streamvisor listening on http://HOST:PORT (N workers, models: ...)`
  once, when every worker has said that it serves; a worker that exits before
  that stops the group with the worker's exit status (its error is on the
  same stderr);
- restarts a worker that exits without being asked, with the same index,
  after a backoff that doubles from 0.25 s to 4 s; a worker that exits a 6th
  time within 60 s (more than 5 restarts) stops the group with status 1;
- on SIGTERM or SIGINT sends SIGTERM to every worker, waits up to
  `[server] shutdown_grace_seconds` + 5 s, kills those left and exits 0;
- warns at start-up about what each worker keeps to itself (`per_worker_state`).

Each worker holds one end of a Unix socket pair with the supervisor: it writes
`ready MODELS` on it when it serves, and when it reads the end of the file, the
supervisor is gone, however it died (kill -9 included), and the worker shuts
down. Not `prctl(PR_SET_PDEATHSIG)`: that signal comes when the *thread* that
started the child ends, and trio starts processes from a worker thread that it
retires when idle; a socket pair also works beyond Linux and carries the
readiness as well.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
from collections import deque

import trio
from hypercorn.utils import repr_socket_addr

from streamvisor.config import StreamvisorConfig

log = logging.getLogger("streamvisor.workers")

#: A worker that exits more than MAX_RESTARTS times within RESTART_PERIOD_SECONDS stops the group.
MAX_RESTARTS = 5
RESTART_PERIOD_SECONDS = 60.0
#: The wait before restarting a worker: doubles with each recent restart, up to the maximum.
FIRST_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 4.0
#: How long past `shutdown_grace_seconds` a worker may take to exit before it is killed.
KILL_AFTER_GRACE_SECONDS = 5.0


def per_worker_state(config: StreamvisorConfig, count: int) -> str | None:
    """What each of `count` workers keeps to itself with `config`, in words for
    an operator; None when everything is shared."""
    enabled = {p.name: p.settings for p in config.plugins if p.enabled}
    shared_redis = getattr(config.server, "redis_url", "")
    local = []
    if "cluster" not in enabled:
        local.append(
            "Sessions: each worker has its own, so reading, following or stopping a session through a request "
            "that lands on another worker answers 404 (the cluster plugin shares them)"
        )
    if "keys" in enabled and not (enabled["keys"].get("redis_url") or shared_redis):
        local.append(
            "API keys' rate limits and concurrent streams: each worker counts its own, so the group allows "
            f"{count} times each configured limit in all (a redis_url for the keys plugin or in [server] shares them)"
        )
    backend = enabled.get("cache", {}).get("backend", "auto")
    if "cache" in enabled and not (backend == "redis" or (backend == "auto" and shared_redis)):
        local.append('The response cache: each worker has its own (backend = "redis" shares it)')
    if not local:
        return None
    shared = " The store is shared by all workers." if "store" in enabled else ""
    return f"with {count} workers, some state is per worker. " + ". ".join(local) + "." + shared


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class WorkerGroup:
    """The supervisor of `count` workers, each started as `command` plus the
    options that make it a worker of `sock`. `run()` returns the exit status."""

    def __init__(self, config: StreamvisorConfig, count: int, command: list[str], sock: socket.socket) -> None:
        self.config = config
        self.count = count
        self.command = command
        self.sock = sock
        self.address = "http://" + repr_socket_addr(sock.family, sock.getsockname())
        self.stopping = trio.Event()
        #: When workers still running after a stop are killed.
        self.kill_at = math.inf
        self.exit_status = 0
        #: The workers that have served at least once; all of them: the group is up.
        self.ready: set[int] = set()
        self.up = False

    async def run(self) -> int:
        note = per_worker_state(self.config, self.count)
        if note:
            log.warning("%s", note)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals)
            async with trio.open_nursery() as workers:
                for index in range(1, self.count + 1):
                    workers.start_soon(self._keep_running, index)
            nursery.cancel_scope.cancel()
        return self.exit_status

    def stop(self, status: int) -> None:
        if self.stopping.is_set():
            return
        self.exit_status = status
        self.kill_at = trio.current_time() + self.config.server.shutdown_grace_seconds + KILL_AFTER_GRACE_SECONDS
        self.stopping.set()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if not self.stopping.is_set():
                    log.info("received %s: stopping %d workers", signal.Signals(signum).name, self.count)
                    self.stop(0)

    async def _keep_running(self, index: int) -> None:
        """Run worker `index` until the group stops, restarting it as it exits."""
        exits: deque[float] = deque()
        while not self.stopping.is_set():
            status, pid = await self._run_worker(index)
            if self.stopping.is_set():
                return
            if not self.up:
                log.error("worker %d (pid %d) %s while the group was starting: stopping", index, pid, describe_exit(status))
                self.stop(status if status > 0 else 1)
                return
            now = trio.current_time()
            exits.append(now)
            while exits[0] < now - RESTART_PERIOD_SECONDS:
                exits.popleft()
            if len(exits) > MAX_RESTARTS:
                log.error(
                    "worker %d (pid %d) %s, %d exits within %g s (more than %d restarts): stopping the group",
                    index, pid, describe_exit(status), len(exits), RESTART_PERIOD_SECONDS, MAX_RESTARTS,
                )
                self.stop(1)
                return
            backoff = min(FIRST_BACKOFF_SECONDS * 2 ** (len(exits) - 1), MAX_BACKOFF_SECONDS)
            log.warning("worker %d (pid %d) %s: restarting it in %g s", index, pid, describe_exit(status), backoff)
            with trio.move_on_after(backoff):
                await self.stopping.wait()

    async def _run_worker(self, index: int) -> tuple[int, int]:
        """Start worker `index` and wait until it exits (stopping it when the
        group stops); its exit status and pid."""
        ours, theirs = socket.socketpair()
        with ours:
            listen_fd = self.sock.fileno()
            try:
                process = await trio.lowlevel.open_process(
                    [
                        *self.command,
                        "--worker-index", str(index),
                        "--listen-fd", str(listen_fd),
                        "--supervisor-fd", str(theirs.fileno()),
                    ],
                    pass_fds=(listen_fd, theirs.fileno()),
                )
            finally:
                theirs.close()
            log.info("worker %d started (pid %d)", index, process.pid)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._wait_until_ready, index, trio.socket.from_stdlib_socket(ours))
                    nursery.start_soon(self._stop_when_asked, index, process)
                    await process.wait()
                    nursery.cancel_scope.cancel()
            finally:
                # Cancelled (the supervisor failed): no worker is left behind.
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
        # Closing `ours` only now keeps a live worker from reading the end of the file.
        assert process.returncode is not None
        return process.returncode, process.pid

    async def _wait_until_ready(self, index: int, channel: trio.socket.SocketType) -> None:
        received = b""
        while b"\n" not in received:
            data = await channel.recv(4096)
            if not data:
                return  # it exited before it served
            received += data
        line = received.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith("ready") or self.stopping.is_set():
            return
        self.ready.add(index)
        if self.up:
            log.info("worker %d serves again", index)
        elif len(self.ready) == self.count:
            self.up = True
            models = line.removeprefix("ready").strip()
            logging.getLogger("streamvisor.ready").info(
                "streamvisor listening on %s (%d workers, models: %s)", self.address, self.count, models
            )

    async def _stop_when_asked(self, index: int, process: trio.Process) -> None:
        await self.stopping.wait()
        process.send_signal(signal.SIGTERM)
        await trio.sleep_until(self.kill_at)
        log.warning("worker %d (pid %d) did not stop in time: killing it", index, process.pid)
        process.kill()
