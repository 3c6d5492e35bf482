"""`python -m bench.keys`: what the keys plugin costs, with limits in memory and in Redis.

Owns: the benchmark row of the keys issue. The default stack of plugins.toml
(with the store on a SQLite file in the run's folder, where keys are kept) is
run three ways, alternately in each round (so drift hits all alike), each on a
fresh server process and a fresh database against the shared fast fake upstream:

- `without`: the default stack, no keys plugin; requests carry no key;
- `memory`: with `[plugins.keys]` before the store, its limits in memory;
- `redis`: the same with `redis_url` (the Redis at 127.0.0.1:6379; `--redis URL`
  for another) and a `key_prefix` of the run's own, whose keys are deleted at
  the end.

The keys variants send `Authorization: Bearer <secret>` of a key made with
`streamvisor keys create` before the server starts. The key has every limit set
(requests and tokens per minute, concurrent streams, a monthly budget) and none
ever reached, so every limit path runs: authentication, reservation at
admission, settlement at the terminal event, spend written to the store. The
model `bench` gets a price (in every variant alike) so that costs and the budget
are real numbers.

Per concurrency it prints each variant's req/s and server CPU per request (the
median of the rounds), and each keys variant's req/s relative to `without`
within the same round (the median of those ratios). Every answer that was not a
200, every failed or incomplete stream and every refusal the keys plugin counted
is printed too (a 401 or 429 would make the numbers meaningless; the command
then exits 1). The target of the issue: at most 10 % less throughput at
concurrency 32.

    .venv/bin/python -m bench.keys --rounds 3 --duration 6
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

from . import servers
from .loadgen import MESSAGES
from .report import RESULTS, Paired
from .scenarios import Bench
from .system import machine, source_state

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: The benchmark key's limits: all set, none reached at any concurrency here.
KEY_LIMITS = ["--rpm", "1000000000", "--tpm", "1000000000000", "--concurrency", "1000000", "--budget", "1000000000", "--period", "month"]
#: US dollars per million tokens of the fake upstream's model, in every variant.
PRICE = {"input": 1.0, "output": 2.0}
#: The keys plugin's counters read from /metrics after each run.
METRICS = {"refused": "streamvisor_keys_refused_total", "redis_errors": "streamvisor_keys_redis_errors_total", "settled": "streamvisor_keys_settled_total"}


def stacks(redis_url: str | None, prefix: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The plugin lists of the variants: the default stack (the store on, its
    URL filled in per server by `with_store`), with the keys plugin just
    before the store in the keys variants."""
    default = servers.default_stack()
    names = [name for name, _ in default]
    if "store" not in names:
        default.insert(names.index("usage") if "usage" in names else len(default), ("store", {}))
    default = [
        (name, {**settings, "prices": {**settings.get("prices", {}), "bench": PRICE}} if name == "pricing" else settings)
        for name, settings in default
    ]

    def with_keys(settings: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for name, table in default:
            if name == "store" and settings is not None:
                out.append(("keys", settings))
            out.append((name, table))
        return out

    variants = {"without": with_keys(None), "memory": with_keys({})}
    if redis_url is not None:
        variants["redis"] = with_keys({"redis_url": redis_url, "key_prefix": prefix})
    return variants


def with_store(plugins: list[tuple[str, dict[str, Any]]], url: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, {**settings, "url": url} if name == "store" else settings) for name, settings in plugins]


def create_key(workdir: Path, config_text: str, name: str) -> str:
    """`streamvisor keys --config <config> create ...` against the server's own
    config (its store, its Redis and prefix) before it starts; the secret."""
    config = workdir / f"{name}-cli.toml"
    config.write_text(config_text)
    argv = [servers.STREAMVISOR, "keys", "--config", str(config), "create", "--identity", "bench", "--name", name, *KEY_LIMITS]
    done = subprocess.run(argv, cwd=servers.ROOT, capture_output=True, text=True, timeout=120)
    found = re.search(r"secret \(shown once[^)]*\): (sk-sv-\S+)", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"streamvisor keys create failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return found.group(1)


def _request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", "Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def check_keys(port: int, auth: dict[str, str]) -> None:
    """Before the load: that the server does what the variant says. Without
    keys a keyless request passes; with them it gets 401, and the key's passes
    with the rate-limit headers of a key with limits."""
    body = {"model": "bench", "messages": MESSAGES}
    status, headers, payload = _request(port, "POST", "/v1/chat/completions", body, auth)
    if status != 200:
        raise RuntimeError(f"the benchmark request got {status}: {payload[:300]!r}")
    if auth:
        if "x-ratelimit-limit-requests" not in headers:
            raise RuntimeError(f"the key's answer has no x-ratelimit headers (are its limits set?): {headers}")
        status, _, payload = _request(port, "POST", "/v1/chat/completions", body)
        if status != 401:
            raise RuntimeError(f"a request without a key got {status}, not 401: the keys plugin is not on? {payload[:300]!r}")


def keys_metrics(port: int) -> dict[str, float]:
    """The keys plugin's refusals, Redis errors and settlements so far (the sum
    over their labels), from GET /metrics; empty when there is none."""
    try:
        status, _, payload = _request(port, "GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in payload.decode(errors="replace").splitlines():
        for name, metric in METRICS.items():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# -- Redis, for checking it answers and deleting the run's keys ------------------------------


class Resp:
    """Just enough of a Redis client (RESP2 over a socket) for PING, SCAN and DEL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5)
        self.file = self.sock.makefile("rb")
        if parts.password:
            self(*(["AUTH", unquote(parts.username), unquote(parts.password)] if parts.username else ["AUTH", unquote(parts.password)]))
        db = parts.path.strip("/")
        if db:
            self("SELECT", db)

    def __call__(self, *args: Any) -> Any:
        encoded = [str(a).encode() if not isinstance(a, bytes) else a for a in args]
        self.sock.sendall(b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"Redis: an unexpected reply {line[:80]!r}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def redis_pid(url: str) -> int | None:
    """The process id of a Redis on this machine (to count its CPU), or None."""
    client = Resp(url)
    try:
        info = client("INFO", "server").decode(errors="replace")
    finally:
        client.close()
    found = re.search(r"^process_id:(\d+)", info, re.M)
    pid = int(found.group(1)) if found else None
    return pid if pid is not None and Path(f"/proc/{pid}/stat").exists() else None


@contextmanager
def redis_prefix(url: str, prefix: str) -> Iterator[str]:
    """Check that Redis answers; at the end delete every key under `prefix`."""
    client = Resp(url)
    try:
        client("PING")
    finally:
        client.close()
    try:
        yield url
    finally:
        client = Resp(url)
        try:
            cursor, deleted = "0", 0
            while True:
                cursor, names = client("SCAN", cursor, "MATCH", prefix.replace("*", r"\*") + "*", "COUNT", 1000)
                cursor = cursor.decode()
                if names:
                    deleted += client("DEL", *names)
                if cursor == "0":
                    break
            print(f"deleted {deleted} Redis keys under {prefix}", file=sys.stderr)
        finally:
            client.close()


# -- the run ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="default 3 (1 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 8; 1 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds before the window (default 2; 0.5 with --quick)")
    parser.add_argument("--concurrency", help="default 1,32,256 (32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one short round at concurrency 32, for a smoke run")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help=f"the Redis of the `redis` variant (default {DEFAULT_REDIS})")
    parser.add_argument("--no-redis", action="store_true", help="without the `redis` variant")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    rounds_n = args.rounds if args.rounds is not None else (1 if quick else 3)
    duration = args.duration if args.duration is not None else (1.0 if quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 2.0)
    levels = [int(c) for c in (args.concurrency or ("32" if quick else "1,32,256")).split(",")]
    options = {"duration": duration, "warmup": warmup, "concurrency": levels, "rounds": rounds_n}
    prefix = f"sv-bench-keys:{uuid.uuid4().hex[:12]}:"
    rounds: dict[str, list[dict[int, dict[str, Any]]]] = {}

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="streamvisor-bench-keys-") as folder, (
        redis_prefix(args.redis, prefix) if not args.no_redis else nullcontext()
    ) as redis_url:
        workdir = Path(folder)
        bench = Bench(options, workdir, progress)
        variants = stacks(redis_url, prefix)
        # Redis's CPU counts for the `redis` variant's cost (it shares the cores).
        redis_process = redis_pid(redis_url) if redis_url else None
        try:
            for round_ in range(1, rounds_n + 1):
                for name, plugins in variants.items():
                    # A fresh database per server, so that none runs on a bigger one.
                    db = workdir / f"store-{name}-{round_}.db"
                    plugins = with_store(plugins, f"sqlite:///{db}")
                    upstream = bench.upstream()
                    config = servers.gateway_config(upstream.port, plugins=plugins)
                    auth: dict[str, str] = {}
                    if name != "without":
                        secret = create_key(workdir, config, f"keys-{name}-{round_}")
                        auth = {"Authorization": f"Bearer {secret}"}
                    server = bench.track(servers.start_streamvisor(workdir, config, name=f"keys-{name}", ready_headers=auth))
                    figures: dict[int, dict[str, Any]] = {}
                    try:
                        check_keys(server.port, auth)
                        # 200s this server gave (check_keys's one included), for
                        # how many of their sessions the keys plugin settled.
                        answered = 1 if auth else 0
                        for level in levels:
                            progress(f"round {round_} of {rounds_n}: {name}, concurrency {level}, {duration} s")
                            before = keys_metrics(server.port)
                            watch = {"server": server.pid, "upstream": upstream.pid}
                            if redis_process is not None and name == "redis":
                                watch["redis"] = redis_process
                            run = bench.load(server.port, level, watch=watch, headers=auth)
                            after = keys_metrics(server.port)
                            statuses = run.get("statuses", {})
                            answered += statuses.get("200", 0)
                            figures[level] = {
                                "rps": run["rps"],
                                "cpu_ms": run["cpu"]["server"] / run["rps"] * 1000 if run["rps"] else float("nan"),
                                "redis_cpu_ms": run["cpu"]["redis"] / run["rps"] * 1000 if run["rps"] and "redis" in run["cpu"] else None,
                                "p50_ms": run["latency_ms"]["p50"],
                                "completed": run["completed"],
                                "statuses": statuses,
                                "answered": statuses.get("200", 0),
                                "non200": sum(n for code, n in statuses.items() if code != "200"),
                                "errors": run["errors"],
                                "error_examples": run["error_examples"],
                                "events_min": run["events_per_response"]["min"],
                                "keys": {k: after[k] - before.get(k, 0.0) for k in after},
                                # Admitted but not yet settled when the load ended:
                                # settling runs behind the requests (their leases and
                                # reservations are still counted meanwhile).
                                "unsettled": answered - after.get("settled", 0.0) if auth else 0,
                                "cpu": run["cpu"],
                            }
                    finally:
                        bench.stop(server)
                        for leftover in workdir.glob(f"store-{name}-{round_}.db*"):
                            leftover.unlink()
                    rounds.setdefault(name, []).append(figures)
        finally:
            bench.stop_all()

    paired = Paired(rounds, levels)
    median, ratio, keyed = paired.median, paired.ratio, paired.others
    print("\n" + paired.tables("keys"))
    print("\nOther processes' CPU in the windows, share of a core (median of rounds; the machine's noise): " + "; ".join(
        f"{n} " + ", ".join(f"{statistics.median(r[level]['cpu'].get('other', 0.0) for r in rounds[n]):.2f}" for level in levels) for n in rounds))
    if "redis" in rounds and all(r[level]["redis_cpu_ms"] is not None for r in rounds["redis"] for level in levels):
        print("\nRedis server CPU per request of the `redis` variant, ms (on the same cores): " + ", ".join(
            f"c{level} {median('redis', level, 'redis_cpu_ms'):.3f}" for level in levels))

    # Every request must have succeeded, or the numbers above mean nothing.
    print("\nFailures, all rounds (non-200 answers, warm-up included / failed or incomplete streams in the window / refusals and Redis errors the keys plugin counted):\n")
    print("| concurrency | " + " | ".join(rounds) + " |")
    print("|---:" * (1 + len(rounds)) + "|")
    failed = False
    for level in levels:
        cells = []
        for name in rounds:
            runs = [r[level] for r in rounds[name]]
            non200 = sum(r["non200"] for r in runs)
            errors = sum(r["errors"] for r in runs)
            refused = sum(r["keys"].get("refused", 0) for r in runs)
            redis_errors = sum(r["keys"].get("redis_errors", 0) for r in runs)
            short = min(r["events_min"] for r in runs) not in (0, 52)
            failed = failed or bool(non200 or errors or refused or redis_errors or short)
            cells.append(f"{non200} / {errors} / {refused:.0f}, {redis_errors:.0f}" + (" (short streams!)" if short else ""))
        print(f"| {level} | " + " | ".join(cells) + " |")
    if failed:
        examples = sorted({e for runs in rounds.values() for r in runs for f in r.values() for e in f["error_examples"]})[:10]
        statuses = {name: [{level: f["statuses"] for level, f in r.items()} for r in runs] for name, runs in rounds.items()}
        print(f"\nWARNING: some requests failed; the throughput above is not the keys plugin's cost.\nstatuses: {json.dumps(statuses)}\nexamples: {examples}")

    if keyed:
        print("\nSessions the keys plugin had not yet settled as a load ended (the server's so far), of that load's 200s; medians of the rounds:\n")
        print("| concurrency | " + " | ".join(keyed) + " |")
        print("|---:" * (1 + len(keyed)) + "|")
        for level in levels:
            print(f"| {level} | " + " | ".join(f"{median(k, level, 'unsettled'):.0f} of {median(k, level, 'answered'):.0f}" for k in keyed) + " |")

    if 32 in levels:
        print("\nTarget of the issue (keys cost at most 10 % of throughput at concurrency 32):")
        for name in keyed:
            r = ratio(name, 32)
            print(f"- {name}: {r:.3f} of `without`, {'met' if r >= 0.9 else 'missed'}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"keys-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {
        "started": started,
        "command": " ".join(["python -m bench.keys", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "source": source_state(servers.ROOT),
        "options": options,
        "redis": None if args.no_redis else {"url": args.redis, "key_prefix": prefix},
        "key_limits": KEY_LIMITS,
        "rounds": {name: [{str(level): f for level, f in r.items()} for r in runs] for name, runs in rounds.items()},
    }
    out.write_text(json.dumps(document, indent=2))
    print(f"\nJSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
