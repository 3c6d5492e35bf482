"""`python -m bench.otel`: what tracing every request costs.

Owns: the benchmark row of the otel issue. The default stack of plugins.toml
(the store on a SQLite file of the run) in front of the fast fake upstream,
two ways, alternately in each round on fresh servers:

- `without`: the default stack as plugins.toml ships it (the otel plugin off);
- `traced`: the same with the otel plugin on, at its place in plugins.toml,
  sampling 1.0, exporting over OTLP/HTTP (its default batch settings) to a
  receiver on loopback (a thread of this process) that answers 200: every
  request's three spans are built, batched, encoded and posted.

Per concurrency it prints req/s and server CPU per request (the median of the
rounds) and `traced` relative to `without` within each round; then how many
spans the traced servers exported, failed and dropped, and how many bytes of
OTLP the receiver got. The issue's target: at most 10 % less throughput.

    .venv/bin/python -m bench.otel --rounds 3 --duration 5
"""

from __future__ import annotations

import http.server
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import paired, servers
from .report import Paired


class Receiver:
    """An OTLP/HTTP traces endpoint that counts the requests and bytes it gets
    (decoding them would only cost this process's CPU, not the server's)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts = 0
        self.bytes = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.posts += 1
                    receiver.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> tuple[int, int]:
        with self.lock:
            taken = (self.posts, self.bytes)
            self.posts = self.bytes = 0
        return taken


def stacks(workdir: Path, receiver: Receiver) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The two plugin lists: the default stack, and the same with the otel
    plugin at its place in plugins.toml's order."""
    from streamvisor.config import load_config

    default = dict(servers.default_stack())
    default["store"] = {**default.get("store", {}), "url": f"sqlite:///{workdir / 'store.db'}"}
    order = [entry.name for entry in load_config(servers.REPO_CONFIG).plugins]
    if "otel" not in order:
        raise SystemExit("the repository's plugins.toml has no [plugins.otel] table")
    traced = {**default, "otel": {"endpoint": receiver.url, "sampling_ratio": 1.0}}

    def ordered(plugins: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        return sorted(plugins.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))

    return {"without": ordered(default), "traced": ordered(traced)}


def span_counts(port: int) -> dict[str, int]:
    """streamvisor_otel_spans_total by result, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(r'^streamvisor_otel_spans_total\{result="(\w+)"\} (\S+)$', text, re.M)}


def main(argv: list[str] | None = None) -> int:
    args = paired.arguments("python -m bench.otel", __doc__).parse_args(argv)
    receiver = Receiver()
    exports: list[dict[str, int]] = []

    def variants(workdir: Path) -> dict[str, Any]:
        return {name: (lambda port, round_, plugins=plugins: servers.gateway_config(port, plugins=plugins)) for name, plugins in stacks(workdir, receiver).items()}

    def after(variant: str, server: servers.Proc) -> None:
        if variant == "traced":
            time.sleep(1.5)  # the last batch (schedule_ms = 1000)
            posts, size = receiver.take()
            exports.append({**span_counts(server.port), "posts": posts, "bytes": size})
        else:
            receiver.take()

    rounds = paired.run(args, "otel", variants, after)
    print("\n" + Paired(rounds, paired.options(args)["concurrency"], base="without").tables("traced"))
    print("\nSpans of the traced servers (per round): " + "; ".join(
        f"{e.get('exported', 0)} exported, {e.get('failed', 0)} failed, {e.get('dropped', 0)} dropped, "
        f"{e['posts']} OTLP posts of {e['bytes'] / max(1, e['posts']) / 1024:.0f} KB on average"
        for e in exports))
    if any(e.get("failed", 0) or e.get("dropped", 0) for e in exports):
        print("WARNING: spans were dropped or failed: the measured cost is not that of exporting every span")
    print(f"\nJSON: {paired.save(args, 'otel', rounds, exports=exports)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
