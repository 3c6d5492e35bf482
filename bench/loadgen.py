"""The load generator: a raw asyncio HTTP/1.1 client, run in its own process.

Owns: sending chat-completion requests over keep-alive connections and timing
them. Three modes, each bounded in count and time, each writing one JSON
document (to `--out`, or stdout):

- `throughput`: C connections, each sending requests back to back for a warm-up
  and then a measured window; reports requests/s completed in the window, the
  total latency and the time to first chunk (the first body bytes that hold
  `data:`; for a non-streamed answer, the first body bytes) of each of them.
  Samples, at the window's edges, its own CPU time, that of the processes under
  test (`--watch NAME=PID`) and the whole machine's, to show who was busy and
  whether anything else was, and counts the status of every answer (warm-up
  included).
- `streams`: N streams at once (the memory scenario); new streams are started
  while fewer than `--ramp` are waiting for their first chunk, so the server's
  accept queue never overflows. Reports how many completed whole.
- `cancel`: K streams, each closed by the client after a random number of
  events; reports, per stream, its tag (sent as the request's `user`) and the
  `time.monotonic()` of the close, for the harness to match with the upstream's
  record of when its connection closed.

Every mode takes `--header 'NAME: VALUE'` (repeatable; e.g. an API key), put
into the request bytes, which are built once.

The client parses just enough HTTP/1.1: a status line, Content-Length or chunked
transfer encoding, `Connection: close`. Run `python -m bench.loadgen --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from typing import Any, Sequence

from .report import summary
from .system import cpu_seconds, raise_fd_limit, system_busy_seconds

now = time.monotonic

#: The fixed prompt of every request.
MESSAGES = [{"role": "user", "content": "Count from one to fifty."}]


def request_bytes(host: str, port: int, path: str, model: str, stream: bool, tag: str | None = None, headers: Sequence[str] = ()) -> bytes:
    """One request, whole: built once per run (or per stream), never per write.
    `headers` are extra `Name: value` lines (e.g. an Authorization header)."""
    body: dict[str, Any]
    if path.endswith("/responses"):
        # The Responses API: the same prompt, as its `input`; usage is always in its last event.
        body = {"model": model, "input": MESSAGES[0]["content"], "stream": stream}
    else:
        body = {"model": model, "messages": MESSAGES, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
    if tag is not None:
        body["user"] = tag
    data = json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{header.strip()}\r\n" for header in headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


class Result:
    __slots__ = ("status", "t_first", "t_end", "body", "events", "http_chunks", "complete", "error")

    def __init__(self) -> None:
        self.status = 0
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.body: list[bytes] = []
        self.events = 0
        #: Chunks of the chunked transfer encoding: the server's body writes.
        self.http_chunks = 0
        self.complete = False
        self.error: str | None = None


class Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.closed = False
        self.future: asyncio.Future[Result] | None = None
        self.result: Result | None = None
        self.stream = True
        self.state = "idle"  # idle, head, length, chunk-size, chunk-data, trailer
        self.remaining = 0
        self.keep_alive = True
        #: For `cancel`: close the connection once this many events arrived.
        self.cut_after: int | None = None
        self.cut_at: float | None = None
        #: Called once the first event arrived (for the `streams` ramp).
        self.on_first: Any = None

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.future is not None and not self.future.done():
            if self.cut_at is not None:
                self._finish()
            else:
                self.result.error = f"connection lost ({exc or 'closed by peer'}) in state {self.state}"  # type: ignore[union-attr]
                self.future.set_result(self.result)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._parse()
        except Exception as exc:  # a malformed response: report it, drop the connection
            if self.future is not None and not self.future.done():
                self.result.error = f"bad response: {exc!r}"  # type: ignore[union-attr]
                self.future.set_result(self.result)  # type: ignore[arg-type]
            self.close()

    # -- use -----------------------------------------------------------------------

    def request(self, data: bytes, stream: bool) -> asyncio.Future[Result]:
        assert self.transport is not None and self.state == "idle"
        self.result = Result()
        self.stream = stream
        self.state = "head"
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.future

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing -------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        if not data:
            return
        result = self.result
        assert result is not None
        result.body.append(data)
        if result.t_first is None and (not self.stream or b"data:" in data or b"data:" in b"".join(result.body[-2:])):
            result.t_first = now()
            if self.on_first is not None:
                self.on_first()
        if self.cut_after is not None:
            result.events += data.count(b"data:")
            if result.events >= self.cut_after and self.cut_at is None:
                self.cut_at = now()
                self.close()

    def _finish(self) -> None:
        result = self.result
        assert result is not None and self.future is not None
        result.t_end = now()
        if self.cut_after is None:
            body = b"".join(result.body)
            result.events = body.count(b"data:")
            # A chat stream ends with [DONE]; a Responses stream with its terminal event.
            result.complete = result.status == 200 and (
                not self.stream or body.endswith(b"data: [DONE]\n\n") or b"event: response.completed\n" in body[-65536:]
            )
            if not result.complete and result.error is None:
                result.error = f"status {result.status}: {body[:200]!r}"
        self.state = "idle"
        if not self.future.done():
            self.future.set_result(result)
        if not self.keep_alive:
            self.close()

    def _parse(self) -> None:
        while self.buffer and self.state != "idle":
            if self.state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buffer[:end].split(b"\r\n")
                self.buffer = self.buffer[end + 4 :]
                self.result.status = int(lines[0].split(b" ", 2)[1])  # type: ignore[union-attr]
                length, chunked, self.keep_alive = 0, False, True
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                    elif name == b"connection" and value.strip().lower() == b"close":
                        self.keep_alive = False
                if chunked:
                    self.state = "chunk-size"
                elif length:
                    self.state, self.remaining = "length", length
                else:
                    self._finish()
            elif self.state == "length":
                take = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(take) :]
                self.remaining -= len(take)
                self._body(take)
                if self.remaining == 0:
                    self._finish()
            elif self.state == "chunk-size":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buffer[:end].split(b";", 1)[0], 16)
                self.buffer = self.buffer[end + 2 :]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.result.http_chunks += 1  # type: ignore[union-attr]
                    self.state, self.remaining = "chunk-data", size + 2  # the data, then CRLF
            elif self.state == "chunk-data":
                take = self.buffer[: self.remaining]
                self.buffer = self.buffer[len(take) :]
                self.remaining -= len(take)
                # The last two bytes of a chunk are its CRLF, not data.
                data = take[: max(0, len(take) - max(0, 2 - self.remaining))]
                self._body(data)
                if self.remaining == 0:
                    self.state = "chunk-size"
            elif self.state == "trailer":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                line = self.buffer[:end]
                self.buffer = self.buffer[end + 2 :]
                if not line:
                    self._finish()
            if self.closed:
                return


async def connect(host: str, port: int) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, host, port)
    return client


def _cpu_sample(pids: dict[str, int]) -> dict[str, float]:
    sample = {"loadgen": time.process_time(), "machine": system_busy_seconds()}
    for name, pid in pids.items():
        try:
            sample[name] = cpu_seconds(pid)
        except OSError:
            pass
    return sample


# -- modes -----------------------------------------------------------------------


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    stream = not args.non_stream
    data = request_bytes(args.host, args.port, args.path, args.model, stream, headers=args.header)
    t_start = now()
    window_start = t_start + args.warmup
    window_end = window_start + args.duration
    latencies: list[float] = []
    ttfcs: list[float] = []
    errors: list[str] = []
    events: list[int] = []
    writes: list[int] = []
    #: The status of every answer, warm-up included (0: no status line came).
    statuses: dict[int, int] = {}
    ramp = asyncio.Semaphore(args.ramp)
    watch = dict(w.split("=", 1) for w in args.watch)
    pids = {name: int(pid) for name, pid in watch.items()}
    cpu: dict[str, dict[str, float]] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - now()))
        cpu["start"] = _cpu_sample(pids)
        await asyncio.sleep(max(0.0, window_end - now()))
        cpu["end"] = _cpu_sample(pids)

    async def worker() -> None:
        client: Client | None = None
        first = True
        while now() < window_end:
            if client is None or client.closed:
                try:
                    async with ramp:
                        client = await connect(args.host, args.port)
                except OSError as exc:
                    errors.append(f"connect: {exc}")
                    await asyncio.sleep(0.05)
                    continue
            t0 = now()
            try:
                if first:
                    async with ramp:
                        result = await asyncio.wait_for(client.request(data, stream), args.timeout)
                    first = False
                else:
                    result = await asyncio.wait_for(client.request(data, stream), args.timeout)
            except asyncio.TimeoutError:
                errors.append("timeout")
                client.close()
                client = None
                continue
            t1 = result.t_end or now()
            statuses[result.status] = statuses.get(result.status, 0) + 1
            if window_start <= t1 <= window_end:
                if result.error is not None:
                    errors.append(result.error)
                else:
                    latencies.append((t1 - t0) * 1000)
                    ttfcs.append(((result.t_first or t1) - t0) * 1000)
                    events.append(result.events)
                    writes.append(result.http_chunks)
            if result.error is not None:
                client.close()
                client = None
        if client is not None:
            client.close()

    sampler = asyncio.ensure_future(sample_cpu())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await sampler
    cpu_share = {}
    if "start" in cpu and "end" in cpu:
        for name in cpu["end"]:
            if name in cpu["start"]:
                cpu_share[name] = round((cpu["end"][name] - cpu["start"][name]) / args.duration, 3)
        # What the rest of the machine used meanwhile (another job on the same
        # cores makes every number here worse).
        ours = sum(v for k, v in cpu_share.items() if k != "machine")
        cpu_share["other"] = round(max(0.0, cpu_share.pop("machine") - ours), 3)
    return {
        "mode": "throughput",
        "stream": stream,
        "concurrency": args.concurrency,
        "duration": args.duration,
        "warmup": args.warmup,
        "completed": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "rps": round(len(latencies) / args.duration, 1),
        "latency_ms": summary(latencies),
        "ttfc_ms": summary(ttfcs),
        "events_per_response": {"min": min(events, default=0), "max": max(events, default=0)},
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        # For chunked responses: how many body writes the server made per response.
        "http_chunks_per_response": summary(writes, digits=1),
        "cpu": cpu_share,
    }


async def streams(args: argparse.Namespace) -> dict[str, Any]:
    """N streams at once; at most `ramp` of them waiting for their first chunk."""
    data = request_bytes(args.host, args.port, args.path, args.model, True, headers=args.header)
    waiting = asyncio.Semaphore(args.ramp)
    t_start = now()
    deadline = t_start + args.timeout
    first_times: list[float] = []
    completed = 0
    errors: list[str] = []
    latencies: list[float] = []
    end_times: list[float] = []

    async def one() -> None:
        nonlocal completed
        await waiting.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                first_times.append(now())
                waiting.release()

        client = None
        try:
            t0 = now()
            client = await asyncio.wait_for(connect(args.host, args.port), max(0.1, deadline - now()))
            client.on_first = release
            result = await asyncio.wait_for(client.request(data, True), max(0.1, deadline - now()))
            if result.error is None and result.complete:
                completed += 1
                latencies.append(((result.t_end or now()) - t0) * 1000)
                end_times.append(result.t_end or now())
            else:
                errors.append(result.error or "incomplete")
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if not released:
                released = True
                waiting.release()
            if client is not None:
                client.close()

    await asyncio.gather(*(one() for _ in range(args.count)))
    return {
        "mode": "streams",
        "streams": args.count,
        "completed": completed,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "all_open_after_s": round(max(first_times) - t_start, 3) if len(first_times) == args.count else None,
        "last_completed_after_s": round(max(end_times) - t_start, 3) if end_times else None,
        "timeout_s": args.timeout,
        "seconds": round(now() - t_start, 3),
        "latency_ms": summary(latencies),
    }


async def cancel(args: argparse.Namespace) -> dict[str, Any]:
    """K streams, each cut by the client after a random number of events."""
    rng = random.Random(args.seed)
    plan = [(f"cut{i}", rng.randint(args.min_events, args.max_events)) for i in range(args.count)]
    queue = list(reversed(plan))
    cuts: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker() -> None:
        while queue:
            tag, events = queue.pop()
            data = request_bytes(args.host, args.port, args.path, args.model, True, tag=tag, headers=args.header)
            try:
                client = await connect(args.host, args.port)
            except OSError as exc:
                errors.append(f"connect: {exc}")
                continue
            client.cut_after = events
            try:
                result = await asyncio.wait_for(client.request(data, True), args.timeout)
            except asyncio.TimeoutError:
                errors.append("timeout")
                client.close()
                continue
            if client.cut_at is None:
                errors.append(result.error or f"the stream ended after {result.events} events, before the cut")
                client.close()
                continue
            cuts.append({"tag": tag, "t_close": client.cut_at, "events": result.events, "planned": events})

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {
        "mode": "cancel",
        "count": args.count,
        "concurrency": args.concurrency,
        "cut": len(cuts),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "cuts": cuts,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description="HTTP/1.1 load generator for the streamvisor benchmark.")
    modes = p.add_subparsers(dest="mode", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--path", default="/v1/chat/completions")
        sub.add_argument("--model", default="bench")
        sub.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take (streams: the whole run)")
        sub.add_argument("--out", help="write the JSON result here (default: stdout)")
        sub.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="an extra request header (repeatable), e.g. 'Authorization: Bearer sk-...'")

    t = modes.add_parser("throughput", help="closed loop at a fixed concurrency")
    common(t)
    t.add_argument("--concurrency", type=int, default=1)
    t.add_argument("--duration", type=float, default=10.0)
    t.add_argument("--warmup", type=float, default=1.0)
    t.add_argument("--non-stream", action="store_true")
    t.add_argument("--ramp", type=int, default=64, help="connections being opened at once")
    t.add_argument("--watch", action="append", default=[], metavar="NAME=PID", help="report this process's CPU share in the window")
    s = modes.add_parser("streams", help="N streams open at once")
    common(s)
    s.add_argument("--count", type=int, default=10_000)
    s.add_argument("--ramp", type=int, default=64, help="streams waiting for their first chunk at once")
    c = modes.add_parser("cancel", help="disconnect mid-stream")
    common(c)
    c.add_argument("--count", type=int, default=1000)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--min-events", type=int, default=1)
    c.add_argument("--max-events", type=int, default=40)
    c.add_argument("--seed", type=int, default=4)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    raise_fd_limit()
    run = {"throughput": throughput, "streams": streams, "cancel": cancel}[args.mode]
    result = asyncio.run(run(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["loadgen_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
