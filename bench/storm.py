"""The disconnect storm: hundreds of clients go away at random points of their
streams, and the gateway must let go of everything they held, at once.

Owns: the plan of the storm (`plan`: which client drops when, in four kinds),
the fake upstream's answers to it (`Upstream`, a chooser for
`streamvisor.testing.FakeUpstream`), the gateway it runs behind
(`gateway_toml`), the raw-socket clients that drop (`drop`), and `run`, which
runs a warm-up storm and the measured one and returns the figures.
`tests/test_storm.py` runs 100 clients against an in-process gateway;
`python -m bench.reliability` runs 1,000 against a gateway in its own process,
so that its memory is its own.

The four kinds of drop:

- `before_headers`: the request is sent and the client closes before anything
  came back: a random moment after the request reached the upstream, which
  waits HEAD_DELAY before its status line, so the gateway is waiting on an
  open upstream connection;
- `after_first_chunk`: closes as soon as the first chunk arrived;
- `mid_stream`: closes after a random number of chunks of the slow stream;
- `during_backoff`: the upstream answers 503 at once, the retry plugin waits
  BACKOFF seconds before its second attempt, and the client closes during that
  wait (a random moment after the first attempt reached the upstream): no
  second attempt may follow.

The drops before the headers are timed from the moment the upstream got the
request (the fake tells the client), not from the client's send: in a burst
the gateway takes a few hundred milliseconds to forward the last of a hundred
requests, and a drop before that would never have had an upstream connection
to close.

What must hold: every upstream connection a dropped client caused is closed
(and soon: the time from the client's close to the upstream connection's
close is measured at the fake, for the kinds that had one open); every dropped
stream is in the usage ledger as `disconnected`, a stream cut mid-way with its
exact partial usage (the upstream sends cumulative usage on every chunk); no
session is left live; and the gateway's memory after the storm is back where
it was after a warm-up storm of the same size.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import httpx

from streamvisor.testing import FakeUpstream, Reply, sse, start_server

from .faultmix import ledger_records
from .report import summary
from .system import cpu_seconds, raise_fd_limit, rss_kb

KINDS = ("before_headers", "after_first_chunk", "mid_stream", "during_backoff")
MODEL = "m1"
PROVIDER = "storm"
#: The slow stream: CHUNKS words, one every CHUNK_DELAY seconds (2 s in all),
#: so that every stream is still live when its client drops, with room to
#: spare: the clients of a storm share one event loop, which lags.
CHUNKS = 40
CHUNK_DELAY = 0.05
PROMPT_TOKENS = 9
#: Seconds the upstream waits before its status line for `before_headers`
#: clients, which drop within BEFORE_WAIT of the upstream getting the request.
HEAD_DELAY = 1.0
BEFORE_WAIT = (0.02, 0.3)
#: The retry plugin's backoff (no jitter), and when `during_backoff` clients
#: drop, counted from the upstream getting (and at once refusing) the request.
BACKOFF = 1.0
BACKOFF_WAIT = (0.05, 0.35)
#: `mid_stream` clients drop after this many chunks (of CHUNKS).
MID_CHUNKS = (2, 20)
#: Clients connecting at once (the gateway's listen backlog is hypercorn's 100).
RAMP = 50
#: Clients in flight at once, by default: a storm, but one a 2-core machine
#: that also runs the clients and the fake upstream can carry. The close times
#: grow with the streams in flight (p50 about 4 ms at 20, about 30 ms at 200,
#: the gateway then using 60 % of a core): past that they measure the queue
#: for the CPU more than the gateway.
CONCURRENCY = 200


def stream_events() -> tuple[bytes, ...]:
    """The slow stream: CHUNKS words, each chunk with the cumulative usage so far."""
    events: list[Any] = []
    for i in range(CHUNKS):
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": i + 1, "total_tokens": PROMPT_TOKENS + i + 1}
        choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": "stop" if i == CHUNKS - 1 else None}
        events.append({"id": "chatcmpl-storm", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice], "usage": usage})
    events.append("[DONE]")
    return sse(*events)


@attrs.frozen
class Plan:
    """One client: its tag (the request's `user` and `X-Request-ID`), its kind,
    how long it waits before dropping (before_headers, during_backoff) or how
    many chunks it reads (after_first_chunk, mid_stream)."""

    tag: str
    kind: str
    wait: float = 0.0
    chunks: int = 0


def plan(clients: int, prefix: str, seed: int) -> list[Plan]:
    """`clients` drops, the four kinds in equal shares, in random order."""
    rng = random.Random(seed)
    plans = []
    for i in range(clients):
        kind = KINDS[i % len(KINDS)]
        tag = f"{prefix}-{i}-{kind}"
        if kind == "before_headers":
            plans.append(Plan(tag, kind, wait=rng.uniform(*BEFORE_WAIT)))
        elif kind == "during_backoff":
            plans.append(Plan(tag, kind, wait=rng.uniform(*BACKOFF_WAIT)))
        elif kind == "after_first_chunk":
            plans.append(Plan(tag, kind, chunks=1))
        else:
            plans.append(Plan(tag, kind, chunks=rng.randint(*MID_CHUNKS)))
    rng.shuffle(plans)
    return plans


class Upstream:
    """The fake upstream's chooser: the answer for each client's kind, by the
    tag in the request's `user`. A `during_backoff` client's first attempt gets
    a 503; a later one (which must not come) would get the stream.
    `on_request(tag)`, when set, hears of every request as it arrives (in the
    fake's thread)."""

    def __init__(self) -> None:
        self.events = stream_events()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.on_request: Callable[[str], None] | None = None

    def __call__(self, body: Any) -> Reply | None:
        tag = _tag(body)
        self.attempts[tag] += 1
        if self.on_request is not None:
            self.on_request(tag)
        if tag.endswith("during_backoff") and self.attempts[tag] == 1:
            return Reply(503, {"Content-Type": "application/json"}, b'{"error": {"message": "busy, try again"}}')
        return Reply(chunks=self.events, chunk_delay=CHUNK_DELAY, delay=HEAD_DELAY if tag.endswith("before_headers") else 0.0)


def gateway_toml(upstream_url: str, clients: int) -> str:
    """The plugins of the gateway under test: the openai provider on the fake,
    retry with a long backoff (the window `during_backoff` clients drop in) and
    no circuit breaker (the 503s must not open it), usage, and the monitor for
    `/metrics` (live sessions, retries). The ledger keeps `clients` records
    individually: the measured storm's, every one of them, while the warm-up's
    fold, so that the ledger holds as much after the storm as after the warm-up."""
    return f"""
[plugins.retry]
attempts = 3
backoff_initial = {BACKOFF}
jitter = 0

[plugins.retry.circuit]
enabled = false

[plugins.usage]
retention_seconds = 3600
max_records = {clients}

[plugins.monitor]

[plugins.openai]
[[plugins.openai.upstreams]]
name = "{PROVIDER}"
base_url = "{upstream_url}"
models = ["{MODEL}"]
"""


def server_settings(clients: int) -> dict[str, Any]:
    """`[server]`: sessions retained long enough to be read after the storm, and
    at most `clients` of them, so that the measured storm's replace the
    warm-up's (the same memory before and after)."""
    return {"log_level": "error", "session_retention_seconds": 600, "max_retained_sessions": clients}


# -- the clients -----------------------------------------------------------------------


@attrs.define
class Drop:
    plan: Plan
    #: time.monotonic() of the client's close.
    closed_at: float = 0.0
    #: Chunks (data events) the client received before it closed.
    chunks: int = 0
    #: What went wrong with the plan: the answer began before a
    #: before_headers/during_backoff drop, or the stream ended before the cut.
    misplanned: str | None = None
    error: str | None = None


def request_bytes(port: int, tag: str) -> bytes:
    body = json.dumps(
        {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "user": tag, "messages": [{"role": "user", "content": f"storm {tag}"}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nX-Request-ID: {tag}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def drop(port: int, item: Plan, ramp: asyncio.Semaphore, reached: asyncio.Event, timeout: float = 30.0) -> Drop:
    """One client: send the request, then drop as planned (a plain close: FIN).
    `reached` is set when the upstream got the request."""
    result = Drop(item)
    try:
        async with ramp:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        result.error = f"connect: {exc}"
        return result
    try:
        writer.write(request_bytes(port, item.tag))
        await writer.drain()
        if item.kind in ("before_headers", "during_backoff"):
            await asyncio.wait_for(reached.wait(), timeout)
            try:
                early = await asyncio.wait_for(reader.read(65536), item.wait)
            except TimeoutError:
                early = b""
            if early:
                result.misplanned = f"the answer began before the drop: {early[:60]!r}"
        else:
            received = b""
            deadline = time.monotonic() + timeout
            while received.count(b"data: ") < item.chunks:
                data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
                if not data:
                    result.misplanned = "the stream ended before the cut"
                    break
                received += data
            if b"data: [DONE]" in received or b'"error"' in received:
                result.misplanned = "the stream ended before the cut"
            result.chunks = received.count(b"data: ")
    except (OSError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.closed_at = time.monotonic()
        # The FIN goes now: `writer.close()` alone closes the socket at the
        # loop's next turn, which in a storm comes late and would be counted
        # against the gateway.
        try:
            writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        writer.close()
    return result


async def storm(port: int, plans: list[Plan], upstream: Upstream, concurrency: int = CONCURRENCY) -> list[Drop]:
    """The clients of `plans`, `concurrency` of them in flight at once (and
    RAMP of those connecting at a time)."""
    loop = asyncio.get_running_loop()
    ramp = asyncio.Semaphore(RAMP)
    slots = asyncio.Semaphore(concurrency)
    reached = {item.tag: asyncio.Event() for item in plans}

    def on_request(tag: str) -> None:
        event = reached.get(tag)
        if event is not None:
            loop.call_soon_threadsafe(event.set)

    async def client(item: Plan) -> Drop:
        async with slots:
            return await drop(port, item, ramp, reached[item.tag])

    upstream.on_request = on_request
    try:
        return await asyncio.gather(*(client(item) for item in plans))
    finally:
        upstream.on_request = None


# -- the gateway -------------------------------------------------------------------------


class Gateway:
    """The gateway under test, in its own process (`streamvisor serve`, so that
    its RSS is its own) or in this one (a `ServerThread`, for the fast test)."""

    def __init__(self, upstream_url: str, clients: int, process: bool, workdir: Path) -> None:
        toml = gateway_toml(upstream_url, clients)
        settings = server_settings(clients)
        self._context = None
        self._proc = None
        if process:
            from .servers import start_streamvisor

            server = "[server]\nhost = \"127.0.0.1\"\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
            self._proc = start_streamvisor(workdir, server + toml, name="storm-gateway")
            self.port = self._proc.port
            self.pid = self._proc.pid
        else:
            self._context = start_server(toml, **settings)
            thread = self._context.__enter__()
            self.port = int(thread.url.rsplit(":", 1)[1])
            self.pid = os.getpid()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (over all its labels) in `GET /metrics`."""
        text = self.http.get("/metrics").text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE))

    def live(self) -> int:
        return int(self.metric("streamvisor_sessions_active"))

    def stop(self) -> None:
        self.http.close()
        if self._proc is not None:
            self._proc.stop()
        if self._context is not None:
            self._context.__exit__(None, None, None)


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _settle(gateway: Gateway, upstream: FakeUpstream, seconds: float) -> None:
    """Until no session is live and no upstream connection open, then `seconds`
    more for the memory to be given back."""
    _wait(lambda: gateway.live() == 0, 30)
    _wait(lambda: upstream.open_connections == 0, 30)
    time.sleep(seconds)


# -- the run -------------------------------------------------------------------------------


@attrs.define
class Observed:
    """What one run saw, before it is reduced to figures."""

    clients: int
    process: bool
    concurrency: int
    drops: list[Drop]
    #: The fake's records of the connections the measured storm's requests used.
    connections: list[Any]
    #: Usage records of the measured storm, by request id (the client's tag).
    records: dict[str, dict[str, Any]]
    #: Content chunks each cut session received (`GET /v1/sessions/{id}`), by tag.
    received: dict[str, int]
    open_after: int
    live_after: int
    retries: float
    rss_before: int
    rss_after: int
    storm_seconds: float
    #: CPU seconds the gateway's process used during the measured storm.
    storm_cpu: float


def measure(clients: int, *, process: bool, concurrency: int, seed: int, settle: float, say: Callable[[str], None]) -> Observed:
    """Run a warm-up storm and the measured one; what was seen."""
    raise_fd_limit()
    chooser = Upstream()
    with tempfile.TemporaryDirectory(prefix="streamvisor-storm-") as folder, FakeUpstream(models=(MODEL,)) as upstream:
        upstream.choose(chooser)
        gateway = Gateway(upstream.url, clients, process, Path(folder))
        try:
            say(f"storm: warm-up, {clients} clients dropping")
            asyncio.run(storm(gateway.port, plan(clients, "warm", seed + 1), chooser, concurrency))
            _settle(gateway, upstream, settle)
            rss_before = rss_kb(gateway.pid)
            retries_before = gateway.metric("streamvisor_upstream_retries_total")
            say(f"storm: {clients} clients dropping at random points")
            plans = plan(clients, "storm", seed)
            started_wall = time.time()
            started, cpu = time.perf_counter(), cpu_seconds(gateway.pid)
            drops = asyncio.run(storm(gateway.port, plans, chooser, concurrency))
            storm_seconds, storm_cpu = time.perf_counter() - started, cpu_seconds(gateway.pid) - cpu
            _settle(gateway, upstream, settle)
            rss_after = rss_kb(gateway.pid)
            live_after = gateway.live()
            retries = gateway.metric("streamvisor_upstream_retries_total") - retries_before
            records = {r["request_id"]: r for r in ledger_records(gateway.http, since=started_wall - 1)}
            received: dict[str, int] = {}
            for d in drops:
                record = records.get(d.plan.tag)
                if record is not None and d.plan.kind in ("after_first_chunk", "mid_stream"):
                    response = gateway.http.get(f"/v1/sessions/{record['session_id']}")
                    if response.status_code == 200:
                        received[d.plan.tag] = response.json()["chunks"] - 1  # less the final "stopped" chunk
            with upstream.lock:
                connections = [attrs.evolve(c) for c in upstream.connection_log if any(_tag(b).startswith("storm-") for b in c.requests)]
                open_after = upstream.open_connections
        finally:
            gateway.stop()
    return Observed(clients, process, concurrency, drops, connections, records, received, open_after, live_after, retries, rss_before, rss_after, storm_seconds, storm_cpu)


def run(
    clients: int = 1000,
    *,
    process: bool = True,
    concurrency: int = CONCURRENCY,
    seed: int = 9,
    settle: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A warm-up storm, then the measured storm of `clients` drops, at most
    `concurrency` clients in flight at once, against a gateway in its own
    process (`process=True`) or in this one. Returns plain numbers:

    - `clients`; `dropped` (clients that closed as planned); `dropped_by_kind`;
      `misplanned` (a drop that was not of its kind: the answer began before a
      before_headers or during_backoff drop, or a stream ended before its cut;
      should be 0) and `client_errors` (a connection refused or reset: 0);
    - `upstream_connections`: upstream connections the storm's requests used;
      `upstream_not_closed`: those still open once everything settled (0);
      `upstream_open_after`: connections open at the fake then, any (0);
    - `close_ms`: from the client's close to the upstream connection's close,
      for drops that had an upstream connection open at the time (n, mean,
      min, p50, p90, p99, max), and `close_ms_by_kind`; `close_ms_p50`,
      `close_ms_p99`, `close_ms_max` repeat the overall ones;
    - `during_backoff_confirmed`: during_backoff drops that came after the
      503 was answered and before any second attempt (the gateway was in its
      backoff wait); `retries_after_drop`: attempts that reached the upstream
      after their client had gone (0); `retries`: from
      `streamvisor_upstream_retries_total`;
    - `not_in_ledger`: dropped streams without a usage record (0);
      `ledger_not_disconnected`: records whose outcome is not `disconnected`
      (0); `partial_usage_wrong`: cut streams (after_first_chunk, mid_stream)
      whose record is not exact, has no completion tokens, fewer than the
      chunks the client got, or not exactly the chunks the session received
      (its `GET /v1/sessions/{id}` chunk count, less the final one the runtime
      adds) (0); `completion_tokens`: the ledger's for the storm;
    - `live_sessions_after` (0);
    - `rss_before_mb` (after the warm-up storm and a settle), `rss_after_mb`
      (after the storm and a settle), `rss_growth_pct`; `gateway`: "process" or
      "in-process" (in-process, the RSS is this whole process's);
    - `seconds` (the whole run), `storm_seconds` (the measured storm),
      `gateway_cpu_share`: the gateway process's CPU seconds per second of the
      storm (1.0: one core busy throughout; in-process, this whole process's):
      the close times are those of a gateway that busy.
    """
    t0 = time.perf_counter()
    seen = measure(clients, process=process, concurrency=concurrency, seed=seed, settle=settle, say=progress or (lambda message: None))
    result = figures(seen)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def figures(seen: Observed) -> dict[str, Any]:
    """The checks and figures of `run` from what a run saw."""
    drops, records = seen.drops, seen.records
    by_tag: dict[str, list[Any]] = collections.defaultdict(list)
    for connection in seen.connections:
        for body in connection.requests:
            by_tag[_tag(body)].append(connection)
    delays: dict[str, list[float]] = collections.defaultdict(list)
    confirmed = retries_after = not_in_ledger = not_disconnected = partial_wrong = 0
    for d in drops:
        tag, kind = d.plan.tag, d.plan.kind
        used = sorted(by_tag.get(tag, []), key=lambda c: c.opened)
        for connection in used:
            # Its close is this request's only when the request was its last
            # (a connection that went back to the pool served another after it).
            last = _tag(connection.requests[-1]) == tag
            if last and connection.closed is not None and connection.closed >= d.closed_at:
                delays[kind].append((connection.closed - d.closed_at) * 1000)
        # Attempts after the first one that began after the client had gone
        # (the storm leaves nothing in the pool: a retry opens a connection).
        retries_after += sum(c.opened > d.closed_at for c in used[1:])
        if kind == "during_backoff" and used:
            first = used[0]
            in_backoff = first.closed is not None and first.closed < d.closed_at
            confirmed += in_backoff and not any(c.opened <= d.closed_at for c in used[1:])
        record = records.get(tag)
        if record is None:
            not_in_ledger += 1
            continue
        not_disconnected += record["outcome"] != "disconnected"
        if kind in ("after_first_chunk", "mid_stream"):
            tokens = record["completion_tokens"]
            partial_wrong += not (record["exact"] and 0 < tokens and tokens >= d.chunks and tokens == seen.received.get(tag))
    overall = summary([v for values in delays.values() for v in values], digits=1)
    return {
        "clients": seen.clients,
        "concurrency": seen.concurrency,
        "dropped": sum(d.error is None for d in drops),
        "upstream_not_closed": sum(c.closed is None for c in seen.connections),
        "close_ms_p50": overall["p50"],
        "close_ms_p99": overall["p99"],
        "close_ms_max": overall["max"],
        "dropped_by_kind": dict(collections.Counter(d.plan.kind for d in drops if d.error is None)),
        "misplanned": sum(d.misplanned is not None for d in drops),
        "client_errors": sum(d.error is not None for d in drops),
        "upstream_connections": len(seen.connections),
        "upstream_open_after": seen.open_after,
        "close_ms": overall,
        "close_ms_by_kind": {kind: summary(values, digits=1) for kind, values in sorted(delays.items())},
        "during_backoff_confirmed": confirmed,
        "retries_after_drop": retries_after,
        "retries": int(seen.retries),
        "not_in_ledger": not_in_ledger,
        "ledger_not_disconnected": not_disconnected,
        "partial_usage_wrong": partial_wrong,
        "completion_tokens": sum(records[d.plan.tag]["completion_tokens"] for d in drops if d.plan.tag in records),
        "live_sessions_after": seen.live_after,
        "rss_before_mb": round(seen.rss_before / 1024, 1),
        "rss_after_mb": round(seen.rss_after / 1024, 1),
        "rss_growth_pct": round((seen.rss_after - seen.rss_before) / seen.rss_before * 100, 1),
        "gateway": "process" if seen.process else "in-process",
        "storm_seconds": round(seen.storm_seconds, 1),
        "gateway_cpu_share": round(seen.storm_cpu / seen.storm_seconds, 2) if seen.storm_seconds else None,
    }


def _tag(body: Any) -> str:
    return body.get("user", "") if isinstance(body, dict) else ""
