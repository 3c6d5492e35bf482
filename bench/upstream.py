"""The fake OpenAI-compatible upstream: a raw asyncio HTTP/1.1 server.

Owns: answering `POST /v1/chat/completions` with a pre-recorded SSE body (50
content chunks, a usage chunk and `[DONE]`, in chunked transfer encoding) and
`GET /v1/models`, over keep-alive connections; and recording, for the
cancellation measurement, when a connection that was in the middle of a stream
was closed by its peer.

It must never be the bottleneck, so by default the whole response (headers and
body) is one pre-built byte string sent with one write, as a static-file server
would. `--chunk-interval S` sends the events one by one, S seconds apart (the
slow upstream of the memory and cancellation scenarios); `--gate N` holds every
stream after its first chunk until N streams have started (so that N streams are
open at once), at most `--gate-timeout` seconds.

Control routes for the harness (not part of the OpenAI API):
`GET /bench/stats` gives the counters and the recorded closes as JSON;
`POST /bench/reset` clears them; `POST /bench/gate?n=N` arms the gate for the
next N streams (the harness warms the server up first, then arms it).

Run: `python -m bench.upstream --port 0`; it prints `ready PORT` when listening.
Times are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process of
the machine), so the harness can compare them with the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from typing import Any

from .system import raise_fd_limit

MODEL = "bench"
CONTENT_CHUNKS = 50
#: Recorded closes kept at most (the harness asks for ~1,000).
MAX_CLOSES = 200_000

_TAG = re.compile(rb'"user"\s*:\s*"([^"]{1,64})"')


def sse_events(chunks: int = CONTENT_CHUNKS, model: str = MODEL) -> list[bytes]:
    """The recorded stream: `chunks` content chunks (the first with the role, the
    last with finish_reason), one usage chunk, then [DONE]; each one SSE event."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model, "system_fingerprint": None}
    events = []
    for i in range(chunks):
        delta: dict[str, Any] = {"content": f" word{i}"}
        if i == 0:
            delta = {"role": "assistant", "content": "word0"}
        finish = "stop" if i == chunks - 1 else None
        body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        events.append(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
    usage = {**head, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}}
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def json_response(body: Any, status: str = "200 OK") -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(data), data)


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.connections_opened = 0
        self.connections_closed = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_cut = 0
        #: One entry per stream whose connection the peer closed mid-stream.
        self.closes: list[dict[str, Any]] = []

    def to_json(self, open_connections: int) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "connections_opened": self.connections_opened,
            "connections_closed": self.connections_closed,
            "open_connections": open_connections,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_cut": self.streams_cut,
            "closes": self.closes,
        }


class Upstream:
    """The server's shared state: the recorded response, the gate, the counters."""

    def __init__(self, interval: float, gate: int, gate_timeout: float, chunks: int) -> None:
        self.interval = interval
        self.events = sse_events(chunks)
        self.burst = SSE_HEAD + b"".join(http_chunk(e) for e in self.events) + LAST_CHUNK
        self.models = json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]})
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.gate = gate
        self.gate_open = asyncio.Event()
        if gate <= 0:
            self.gate_open.set()
        self.gate_timeout = gate_timeout
        self.gate_opened_at: float | None = None

    def arm_gate(self, n: int) -> None:
        """Hold the next streams after their first chunk until `n` have started."""
        self.gate = n
        self.stats.streams_started = 0
        self.gate_opened_at = None
        if n > 0:
            self.gate_open = asyncio.Event()
        else:
            self.gate_open.set()

    def stream_started(self) -> None:
        self.stats.streams_started += 1
        if not self.gate_open.is_set() and self.stats.streams_started >= self.gate:
            self.gate_opened_at = time.monotonic()
            self.gate_open.set()

    def stats_response(self) -> bytes:
        body = self.stats.to_json(len(self.connections))
        body["gate"] = {"size": self.gate, "open": self.gate_open.is_set(), "opened_at": self.gate_opened_at}
        return json_response(body)


class Connection(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        #: The stream in progress on this connection: its tag and events sent.
        self.streaming = False
        self.tag: str | None = None
        self.sent = 0
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    # -- connection events -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.server.stats.connections_opened += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming:
            self.handle_requests()

    def eof_received(self) -> bool:
        self.peer_closed()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer_closed()
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def peer_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        stats = self.server.stats
        stats.connections_closed += 1
        if self.streaming:
            stats.streams_cut += 1
            if len(stats.closes) < MAX_CLOSES:
                stats.closes.append({"tag": self.tag, "t_close": now, "events_sent": self.sent})

    # -- requests ------------------------------------------------------------------

    def handle_requests(self) -> None:
        while not self.streaming and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.respond(method, path, body)
            if close and self.transport is not None:
                self.transport.close()
                return

    def respond(self, method: str, target: str, body: bytes) -> None:
        server, transport = self.server, self.transport
        assert transport is not None
        path, _, query = target.partition("?")
        if path.startswith("/bench/"):
            if path == "/bench/reset" and method == "POST":
                server.stats.reset()
                transport.write(json_response({"reset": True}))
            elif path == "/bench/gate" and method == "POST":
                server.arm_gate(int(query.removeprefix("n=") or 0))
                transport.write(json_response({"gate": server.gate}))
            elif path == "/bench/stats":
                transport.write(server.stats_response())
            else:
                transport.write(json_response({"error": "no such route"}, "404 Not Found"))
            return
        server.stats.requests += 1
        if path == "/v1/models" and method == "GET":
            transport.write(server.models)
        elif path == "/v1/chat/completions" and method == "POST":
            match = _TAG.search(body)
            self.tag = match.group(1).decode() if match else None
            self.start_stream()
        else:
            transport.write(json_response({"error": {"message": f"no route {method} {path}"}}, "404 Not Found"))

    def start_stream(self) -> None:
        server = self.server
        server.stream_started()
        if server.interval <= 0 and server.gate_open.is_set():
            # The common case: the whole response in one write, nothing to wait for.
            self.transport.write(server.burst)  # type: ignore[union-attr]
            server.stats.streams_completed += 1
            return
        self.streaming = True
        self.sent = 0
        self.task = asyncio.get_running_loop().create_task(self.send_slowly())

    async def send_slowly(self) -> None:
        server, transport = self.server, self.transport
        assert transport is not None
        events = server.events
        transport.write(SSE_HEAD + http_chunk(events[0]))
        self.sent = 1
        if not server.gate_open.is_set():
            try:
                await asyncio.wait_for(server.gate_open.wait(), server.gate_timeout)
            except asyncio.TimeoutError:
                pass
        for event in events[1:]:
            if server.interval > 0:
                await asyncio.sleep(server.interval)
            if self.closed:
                return
            transport.write(http_chunk(event))
            self.sent += 1
        transport.write(LAST_CHUNK)
        self.streaming = False
        self.tag = None
        server.stats.streams_completed += 1
        self.task = None
        if self.buffer:
            self.handle_requests()


async def serve(port: int, interval: float, gate: int, gate_timeout: float, chunks: int) -> None:
    loop = asyncio.get_running_loop()
    state = Upstream(interval, gate, gate_timeout, chunks)
    server = await loop.create_server(lambda: Connection(state), "127.0.0.1", port, backlog=4096, reuse_address=True)
    actual = server.sockets[0].getsockname()[1]
    print(f"ready {actual}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunk-interval", type=float, default=0.0, help="seconds between events (0: the whole body in one write)")
    p.add_argument("--chunks", type=int, default=CONTENT_CHUNKS, help="content chunks per stream")
    p.add_argument("--gate", type=int, default=0, help="hold streams after their first chunk until this many have started")
    p.add_argument("--gate-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    raise_fd_limit()
    try:
        asyncio.run(serve(args.port, args.chunk_interval, args.gate, args.gate_timeout, args.chunks))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
