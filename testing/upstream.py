"""A scripted OpenAI-compatible upstream on loopback, for failures a real model
server will not produce on demand: error statuses with `Retry-After`, resets
mid-stream, silence, malformed events, slow drips.

`FakeUpstream` answers each `POST /chat/completions` with the next queued
`Reply` (`then(...)`, `queue(...)`), else with what its chooser picks for the
request (`choose(fn)`: a mix of answers at set rates, or an answer per client),
else with its default one (`respond(...)`, `reply(...)`); `GET /models` lists
its `models`. It counts requests and connections, open and in all, so that a
test can show nothing was left open, and keeps a `ConnectionRecord` per
connection (`connection_log`: when it opened and closed, what was asked on it,
whether the client left mid-answer), so that a test can time how soon a client
that went away closed its connection. Every thread it starts is a daemon;
`close()` stops it (the fixture does).
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

import attrs

__all__ = ["ConnectionRecord", "FakeUpstream", "Reply", "closed_port", "completion_events", "sse"]


def sse(*events: Any) -> tuple[bytes, ...]:
    """SSE frames: a dict becomes `data: <json>`, a str or bytes is sent as the data."""
    frames = []
    for event in events:
        if isinstance(event, dict):
            data = json.dumps(event).encode()
        elif isinstance(event, str):
            data = event.encode()
        else:
            data = event
        frames.append(b"data: " + data + b"\n\n")
    return tuple(frames)


def completion_events(text: str, *, model: str = "m1", finish_reason: str = "stop", usage: bool = True) -> tuple[bytes, ...]:
    """A streamed chat completion of `text`, one word per chunk, then (when
    `usage`) a usage chunk counting words, then `[DONE]`."""
    words = [w + " " for w in text.split(" ")] if text else []
    if words:
        words[-1] = words[-1].rstrip(" ")
    events: list[Any] = []
    for i, word in enumerate(words):
        last = i == len(words) - 1
        events.append(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish_reason if last else None}],
            }
        )
    if usage:
        events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}})
    events.append("[DONE]")
    return sse(*events)


@attrs.frozen
class Reply:
    """One answer of the fake upstream.

    With `chunks`, the body is streamed with chunked transfer encoding, one write
    per chunk; otherwise `body` is sent with a Content-Length (or as it is, with
    no framing at all, when `raw`). The failure knobs act on the chunks:
    `reset_after=N` sends N chunks and then resets the connection (RST),
    `hang_after=N` sends N chunks and then goes silent until the client leaves,
    `close_after=N` sends N chunks and closes cleanly without ending the body.
    """

    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    chunks: tuple[bytes, ...] = ()
    #: Seconds before the status line, and between chunks.
    delay: float = 0.0
    chunk_delay: float = 0.0
    reset_after: int | None = None
    hang_after: int | None = None
    close_after: int | None = None
    #: Send `body` exactly as given, status line and headers included.
    raw: bool = False


class _Server(ThreadingHTTPServer):
    #: The listen backlog. socketserver's default of 5 drops the connections of
    #: a burst (a gateway opening a hundred at once), whose clients then retry
    #: their SYN only a second later: a delay that would be the fake's, not the
    #: gateway's.
    request_queue_size = 1024


@attrs.define
class ConnectionRecord:
    """One connection the fake accepted. Times are `time.monotonic()`, the same
    clock in every process of the machine."""

    opened: float
    #: When it closed (None while open): the moment the fake saw the client
    #: close it, or the fake's own close when the fake ended it.
    closed: float | None = None
    #: The JSON body of every POST on it, in order (the raw bytes when not JSON).
    requests: list[Any] = attrs.field(factory=list)
    #: The client closed it before the answer in progress had ended (while the
    #: fake waited before the status line, between chunks or in silence).
    cut: bool = False


class FakeUpstream:
    def __init__(self, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None, *, models: Iterable[str] = ("m1",)) -> None:
        self.models = list(models)
        self.script: list[Reply] = []
        self.default = Reply(status, dict(headers or {}), body)
        #: Picks the answer to a POST when none is queued (see `choose`).
        self.chooser: Callable[[Any], Reply | None] | None = None
        #: Every connection accepted, in order (see `ConnectionRecord`).
        self.connection_log: list[ConnectionRecord] = []
        #: Seconds every answer waits before its status line (on top of a Reply's own).
        self.delay = 0.0
        self.posts = 0
        self.seen_auth: list[str | None] = []
        #: Every POST's headers, names in lower case.
        self.seen_headers: list[dict[str, str]] = []
        self.seen_bodies: list[Any] = []
        #: Connections open now, and accepted in all.
        self.open_connections = 0
        self.connections = 0
        self.lock = threading.Lock()
        self._closing = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as model servers set it: without it each small write
            # after the first waits for the client's delayed ACK (40 ms).
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.record = ConnectionRecord(time.monotonic())
                with outer.lock:
                    outer.open_connections += 1
                    outer.connections += 1
                    outer.connection_log.append(self.record)

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    # A client that resets its connection (as a gateway cancelling
                    # a request may) is what the fake is for, not an error to print.
                    self.close_connection = True

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass
                with outer.lock:
                    outer.open_connections -= 1
                    if self.record.closed is None:
                        self.record.closed = time.monotonic()

            def _client_left(self) -> None:
                """The client closed the connection before the answer ended."""
                with outer.lock:
                    self.record.cut = True
                    if self.record.closed is None:
                        self.record.closed = time.monotonic()
                self.close_connection = True

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]}).encode()
                self._send_plain(Reply(200, {"Content-Type": "application/json"}, body))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                with outer.lock:
                    outer.posts += 1
                    outer.seen_auth.append(self.headers.get("Authorization"))
                    outer.seen_headers.append({k.lower(): v for k, v in self.headers.items()})
                    outer.seen_bodies.append(body)
                    self.record.requests.append(body)
                    reply = outer.script.pop(0) if outer.script else None
                    if reply is None and outer.chooser is not None:
                        reply = outer.chooser(body)
                    if reply is None:
                        reply = outer.default
                    delay = outer.delay + reply.delay
                if delay and not self._pause(delay):
                    return
                try:
                    if reply.raw:
                        self.close_connection = True
                        self.wfile.write(reply.body)
                        self.wfile.flush()
                        self._after(reply, 0)
                    elif reply.chunks:
                        self._send_chunks(reply)
                    else:
                        self._send_plain(reply)
                except (BrokenPipeError, ConnectionResetError):
                    self._client_left()

            def _send_plain(self, reply: Reply) -> None:
                self.send_response(reply.status)
                self.send_header("Content-Length", str(len(reply.body)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def _send_chunks(self, reply: Reply) -> None:
                self.send_response(reply.status)
                self.send_header("Transfer-Encoding", "chunked")
                headers = {"Content-Type": "text/event-stream", **reply.headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.flush()
                for sent, chunk in enumerate(reply.chunks):
                    if self._after(reply, sent):
                        return
                    if sent and reply.chunk_delay and not self._pause(reply.chunk_delay):
                        return
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                if self._after(reply, len(reply.chunks)):
                    return
                self.wfile.write(b"0\r\n\r\n")

            def _after(self, reply: Reply, sent: int) -> bool:
                """Act on a failure knob once `sent` chunks are out; True when the reply ends here."""
                if reply.reset_after == sent:
                    # SO_LINGER 0: close() sends a RST instead of a FIN.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return True
                if reply.close_after == sent:
                    self.close_connection = True
                    return True
                if reply.hang_after == sent:
                    self._hang()
                    self.close_connection = True
                    return True
                if reply.raw and sent == 0:
                    return True
                return False

            def _hang(self) -> None:
                """Say nothing until the client closes the connection (or the fake stops)."""
                self.wfile.flush()
                while not outer._closing.is_set():
                    if not self._pause(0.05):
                        return

            def _pause(self, seconds: float) -> bool:
                """Wait `seconds` in the middle of an answer, watching the
                connection; False (and the close recorded) as soon as the client
                closes it, so that a test sees when it left, not when the next
                write failed."""
                deadline = time.monotonic() + seconds
                # poll, not select: a storm of clients takes descriptors past 1024.
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        readable = poller.poll(max(1, round(left * 1000)))
                        # Mid-answer, an HTTP/1.1 client sends nothing: a readable
                        # socket is its close (or bytes of a pipelined request,
                        # which are left for the next request to read).
                        if readable and not self.connection.recv(1, socket.MSG_PEEK):
                            self._client_left()
                            return False
                    except OSError:
                        self._client_left()
                        return False
                    if readable:
                        time.sleep(max(0.0, deadline - time.monotonic()))
                        break
                return True

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-upstream")
        self._thread.start()

    # -- scripting ---------------------------------------------------------------

    def respond(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Set the default answer: a plain body."""
        with self.lock:
            self.default = Reply(status, dict(headers or {}), body)

    def reply(self, reply: Reply) -> None:
        """Set the default answer."""
        with self.lock:
            self.default = reply

    def then(self, status: int, body: bytes = b"", **headers: str) -> None:
        """Queue one plain answer; `Retry_After="1"` becomes the header Retry-After."""
        self.queue(Reply(status, {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}, body))

    def queue(self, *replies: Reply) -> None:
        """Queue answers, used before the default one, first queued first."""
        with self.lock:
            self.script.extend(replies)

    def choose(self, chooser: Callable[[Any], Reply | None] | None) -> None:
        """Pick the answer to every POST that no queued answer takes:
        `chooser(body)` gets the request's JSON body and returns a `Reply`, or
        None for the default one. It is called under the fake's lock, one
        request at a time, so it may keep state (a seeded `random.Random` for a
        mix of answers at set rates, a count per client for "fail first, then
        answer"). `None` removes it."""
        with self.lock:
            self.chooser = chooser

    def stream(self, text: str, **knobs: Any) -> None:
        """Set the default answer to a streamed completion of `text` (see `Reply` for the knobs)."""
        self.reply(Reply(chunks=completion_events(text), **knobs))

    def fail_next(self, count: int, status: int = 503, message: str = "the fake upstream fails on purpose", **headers: str) -> None:
        """Queue `count` error answers with `status`."""
        body = json.dumps({"error": {"message": message}}).encode()
        for _ in range(count):
            self.then(status, body, **headers)

    # -- life ----------------------------------------------------------------------

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Wait until no connection is open; whether that happened in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.open_connections == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeUpstream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released): connections to
    it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
