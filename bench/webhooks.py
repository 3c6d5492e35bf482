"""`python -m bench.webhooks`: what announcing every session by webhook costs.

Owns: the benchmark row of the webhooks issue. The default stack of plugins.toml
(the store on a SQLite file of the run, the webhooks plugin in it) in front of
the fast fake upstream, two ways, alternately in each round on fresh servers:

- `quiet`: the webhooks plugin with no endpoint (what plugins.toml ships);
- `announcing`: one endpoint subscribed to `session.completed`, a receiver on
  loopback (a thread of this process) that answers 200: every session's end
  is written to the outbox with the session's final row, claimed, signed and
  POSTed.

Per concurrency it prints req/s and server CPU per request (the median of the
rounds) and `announcing` relative to `quiet` within each round; then how many
sessions were delivered (every one must be, exactly once) and how long after
its end a session's event reached the receiver (p50, p99).

    .venv/bin/python -m bench.webhooks --rounds 3 --duration 5
"""

from __future__ import annotations

import http.server
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import paired, servers
from .report import Paired

SECRET = "whsec_" + "YmVuY2htYXJrLXNlY3JldC1vZi0yNC1ieXRlcw=="


class Receiver:
    """Counts deliveries by webhook-id and keeps the lag of each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: dict[str, int] = {}
        self.lags: list[float] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.time()
                finished = json.loads(body)["data"].get("finished_at") or now
                with receiver.lock:
                    message = self.headers["webhook-id"]
                    receiver.ids[message] = receiver.ids.get(message, 0) + 1
                    receiver.lags.append(now - finished)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.ids.clear()
            self.lags.clear()


def config(upstream_port: int, workdir: Path, name: str, receiver: Receiver | None) -> str:
    plugins = []
    for plugin, settings in servers.default_stack():
        if plugin == "store":
            settings = {**settings, "url": f"sqlite:///{workdir / (name + '.db')}"}
        if plugin == "webhooks":
            settings = {k: v for k, v in settings.items() if k != "endpoints"}
        plugins.append((plugin, settings))
    if "webhooks" not in [p for p, _ in plugins]:
        raise SystemExit("the repository's plugins.toml does not enable the webhooks plugin")
    text = servers.gateway_config(upstream_port, plugins=plugins)
    if receiver is not None:
        text += (
            "\n[[plugins.webhooks.endpoints]]\n"
            f'url = "http://127.0.0.1:{receiver.port}/hook"\nsecret = "{SECRET}"\n'
            'events = ["session.completed"]\nallow_private = true\n'
        )
    return text


def sessions_of(port: int) -> int:
    return int(servers.http_json(port, "GET", "/v1/usage")["totals"]["sessions"])


def main(argv: list[str] | None = None) -> int:
    args = paired.arguments("python -m bench.webhooks", __doc__).parse_args(argv)
    receiver = Receiver()
    deliveries: list[dict[str, Any]] = []

    def variants(workdir: Path) -> dict[str, Any]:
        def config_of(name: str) -> Any:
            return lambda port, round_: config(port, workdir, f"{name}-{round_}", receiver if name == "announcing" else None)

        return {name: config_of(name) for name in ("quiet", "announcing")}

    def after(variant: str, server: servers.Proc) -> None:
        if variant != "announcing":
            receiver.reset()
            return
        # Every session that completed must arrive, once.
        deadline = time.monotonic() + 60
        while True:
            total = sessions_of(server.port)
            with receiver.lock:
                got = len(receiver.ids)
            if got >= total or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with receiver.lock:
            lags = sorted(receiver.lags)
            twice = sum(1 for n in receiver.ids.values() if n > 1)
        receiver.reset()
        deliveries.append({
            "sessions": total, "delivered": got, "duplicates": twice,
            "lag_p50_ms": lags[len(lags) // 2] * 1000 if lags else None,
            "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000 if lags else None,
        })

    rounds = paired.run(args, "webhooks", variants, after)
    print("\n" + Paired(rounds, paired.options(args)["concurrency"], base="quiet").tables("webhooks"))
    print("\nDeliveries (announcing, per round): " + "; ".join(
        f"{d['delivered']}/{d['sessions']} delivered, {d['duplicates']} twice, lag p50 {d['lag_p50_ms']:.0f} ms p99 {d['lag_p99_ms']:.0f} ms"
        for d in deliveries if d["lag_p50_ms"] is not None))
    if deliveries:
        print(f"Median lag p50 over rounds: {statistics.median(d['lag_p50_ms'] for d in deliveries if d['lag_p50_ms'] is not None):.0f} ms")
    lost = any(d["delivered"] < d["sessions"] for d in deliveries)
    if lost:
        print("WARNING: some sessions were not delivered within 60 s")
    print(f"\nJSON: {paired.save(args, 'webhooks', rounds, deliveries=deliveries)}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
