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

import argparse
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import servers
from .report import RESULTS, Paired
from .scenarios import Bench
from .system import machine, source_state

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
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    options = {"duration": args.duration, "warmup": args.warmup, "concurrency": levels, "rounds": args.rounds}

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    receiver = Receiver()
    rounds: dict[str, list[dict[int, dict[str, Any]]]] = {"quiet": [], "announcing": []}
    deliveries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-webhooks-") as folder:
        workdir = Path(folder)
        bench = Bench(options, workdir, progress)
        try:
            for round_ in range(1, args.rounds + 1):
                for name in rounds:
                    upstream = bench.upstream()
                    text = config(upstream.port, workdir, f"{name}-{round_}", receiver if name == "announcing" else None)
                    server = bench.track(servers.start_streamvisor(workdir, text, name=f"webhooks-{name}"))
                    receiver.reset()
                    figures: dict[int, dict[str, Any]] = {}
                    try:
                        for level in levels:
                            progress(f"round {round_} of {args.rounds}: {name}, concurrency {level}")
                            run = bench.load(server.port, level, watch={"server": server.pid, "upstream": upstream.pid})
                            figures[level] = {
                                "rps": run["rps"],
                                "cpu_ms": run["cpu"]["server"] / run["rps"] * 1000 if run["rps"] else float("nan"),
                                "p50_ms": run["latency_ms"]["p50"],
                            }
                        if name == "announcing":
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
                            deliveries.append({
                                "sessions": total, "delivered": got, "duplicates": twice,
                                "lag_p50_ms": lags[len(lags) // 2] * 1000 if lags else None,
                                "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000 if lags else None,
                            })
                    finally:
                        bench.stop(server)
                    rounds[name].append(figures)
        finally:
            bench.stop_all()
    print("\n" + Paired(rounds, levels, base="quiet").tables("webhooks"))
    print("\nDeliveries (announcing, per round): " + "; ".join(
        f"{d['delivered']}/{d['sessions']} delivered, {d['duplicates']} twice, lag p50 {d['lag_p50_ms']:.0f} ms p99 {d['lag_p99_ms']:.0f} ms"
        for d in deliveries if d["lag_p50_ms"] is not None))
    if deliveries:
        print(f"Median lag p50 over rounds: {statistics.median(d['lag_p50_ms'] for d in deliveries if d['lag_p50_ms'] is not None):.0f} ms")
    lost = any(d["delivered"] < d["sessions"] for d in deliveries)
    if lost:
        print("WARNING: some sessions were not delivered within 60 s")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"webhooks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine(), "source": source_state(servers.ROOT), "options": options,
                               "rounds": {n: [{str(k): v for k, v in r.items()} for r in runs] for n, runs in rounds.items()},
                               "deliveries": deliveries}, indent=2))
    print(f"\nJSON: {out}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
