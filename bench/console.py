"""`python -m bench.console`: what a console viewer costs the streams.

Owns: the benchmark row of the console issue. One server (the default stack of
plugins.toml, the console plugin in it, the store on a SQLite file of the run)
in front of the fast fake upstream. In each round, at each concurrency, the load
generator runs twice on the same server: with no console open (`alone`), and
with one signed-in viewer reading the live feed (`watched`, an SSE client in a
thread of this process that counts what it receives). Printed: req/s and
server CPU per request of each, the paired ratio watched/alone within each
round, and what the viewer received.

    .venv/bin/python -m bench.console --rounds 3 --duration 5
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from . import paired, servers
from .report import Paired
from .scenarios import Bench

ADMIN_KEY = "bench-console-admin-key"


class Viewer:
    """A console viewer: signs in with the admin key, then reads the live feed
    until stopped, counting messages, bytes and the sessions it saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages = 0
        self.bytes = 0
        self.sessions: set[str] = set()
        self._stop = threading.Event()
        self._connection: http.client.HTTPConnection | None = None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/console/login", body=f"key={ADMIN_KEY}", headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        cookie = response.getheader("Set-Cookie") or ""
        conn.close()
        if response.status != 303 or "sv_console=" not in cookie:
            raise SystemExit(f"the console refused the admin key: {response.status}")
        self.cookie = cookie.split(";", 1)[0]
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> "Viewer":
        self.thread.start()
        return self

    def _read(self) -> None:
        conn = self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/console/api/feed", headers={"Cookie": self.cookie, "Accept": "text/event-stream"})
        response = conn.getresponse()
        try:
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return
                self.bytes += len(line)
                if line.startswith(b"data: "):
                    self.messages += 1
                    message = json.loads(line[6:])
                    for row in message.get("sessions", []) + message.get("upsert", []):
                        self.sessions.add(row["id"])
        except (OSError, ValueError):
            return

    def stop(self) -> None:
        self._stop.set()
        if self._connection is not None and self._connection.sock is not None:
            try:
                self._connection.sock.shutdown(2)
            except OSError:
                pass
        self.thread.join(5)


def main(argv: list[str] | None = None) -> int:
    args = paired.arguments("python -m bench.console", __doc__).parse_args(argv)
    options = paired.options(args)
    levels = options["concurrency"]
    os.environ["STREAMVISOR_ADMIN_KEY"] = ADMIN_KEY  # the server inherits it

    rounds: paired.Rounds = {"alone": [], "watched": []}
    seen: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-console-") as folder:
        workdir = Path(folder)
        bench = Bench(options, workdir, paired.progress)
        try:
            plugins = servers.default_stack()
            names = [name for name, _ in plugins]
            if "console" not in names:
                plugins.append(("console", {}))
            plugins = [(name, {**settings, "url": f"sqlite:///{workdir / 'store.db'}"} if name == "store" else settings) for name, settings in plugins]
            upstream = bench.upstream()
            server = bench.track(servers.start_streamvisor(workdir, servers.gateway_config(upstream.port, plugins=plugins), name="console"))
            for round_ in range(1, args.rounds + 1):
                figures: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in rounds}
                for level in levels:
                    for name in rounds:
                        paired.progress(f"round {round_} of {args.rounds}: {name}, concurrency {level}")
                        viewer = Viewer(server.port).start() if name == "watched" else None
                        try:
                            run = bench.load(server.port, level, watch={"server": server.pid, "upstream": upstream.pid})
                        finally:
                            if viewer is not None:
                                viewer.stop()
                        figures[name][level] = paired.measured(run)
                        if viewer is not None:
                            seen.append({"round": round_, "concurrency": level, "messages": viewer.messages, "bytes": viewer.bytes, "sessions": len(viewer.sessions)})
                for name in rounds:
                    rounds[name].append(figures[name])
        finally:
            bench.stop_all()
    print("\n" + Paired(rounds, levels, base="alone").tables("console"))
    print("\nThe viewer received (per run): " + "; ".join(
        f"c{s['concurrency']} {s['messages']} messages, {s['bytes'] / 1024:.0f} KiB, {s['sessions']} sessions" for s in seen))
    print(f"\nJSON: {paired.save(args, 'console', rounds, viewer=seen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
