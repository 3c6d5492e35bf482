"""A small HTTP/1.1 client on trio, for providers that talk to upstream servers.

Why not httpx: relaying one streamed completion through httpx + httpcore cost
about 1.6 ms of CPU (half of the gateway's time per request, see
docs/performance.md): client layers, a pool that scans every connection on every
request and response close, a cancel scope and exception-mapping context manager
around every socket call, and h11's general state machine. An upstream call here
is one request write and, usually, one read that holds the headers and the whole
chunked body; this module does just that:

- one `HTTPClient` per upstream (one origin: scheme, host, port, base path), with
  a pool of keep-alive connections: at most `max_connections` in use, at most
  `max_idle` idle ones kept (newest reused first, each checked with one `select`
  for a close by the peer, dropped after `idle_expiry` seconds);
- explicit timeouts: connect (TCP + TLS), write, read (the longest gap between two
  reads of a response, not the whole response), and pool (waiting for a slot);
- responses with `Content-Length`, chunked, or read until close; `1xx` skipped;
  trailers read and dropped; every header block and chunk-size line is bounded;
- TLS through `trio.SSLStream` (system CAs, or a CA file, or no verification).

A response is read with `await response.receive()` (the body bytes decoded so
far, `b""` at its end) inside `async with client.stream(...)`. Leaving that block
before the body's end, by an error, a cancellation or a `break`, closes the
connection at once; a connection goes back to the pool only after a complete
response the server did not mark `Connection: close`. No method of this module
swallows `trio.Cancelled`.

Not here: HTTP/2, proxies, redirects, compression (no `Accept-Encoding` is sent),
cookies, request bodies that are not bytes.
"""

from __future__ import annotations

import collections
import ssl
import time
from typing import Iterable
from urllib.parse import SplitResult, urlsplit

import trio

__all__ = [
    "HTTPClient",
    "check_base_url",
    "check_header",
    "Response",
    "TransportError",
    "ConnectError",
    "ReadError",
    "WriteError",
    "ProtocolError",
    "TimeoutError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
]


class TransportError(Exception):
    """The request did not get a complete answer: no connection, a broken one, a
    timeout, or a response that is not HTTP/1.x."""


class ConnectError(TransportError):
    """No connection could be made (refused, unreachable, DNS, TLS handshake)."""


class ReadError(TransportError):
    """The connection broke while the response was read."""


class WriteError(TransportError):
    """The connection broke while the request was written."""


class ProtocolError(TransportError):
    """The server's answer is not valid HTTP/1.x (or exceeds a bound)."""


class TimeoutError(TransportError):  # noqa: A001 - the module's own name for it
    """A timeout of the client expired."""


class ConnectTimeout(TimeoutError):
    pass


class ReadTimeout(TimeoutError):
    pass


class WriteTimeout(TimeoutError):
    pass


class PoolTimeout(TimeoutError):
    pass


_RECEIVE_SIZE = 64 * 1024
_MAX_LINE = 8 * 1024

# Body framing of a response.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2
# States of the chunked decoder while it is not inside a chunk's data.
_SIZE_LINE, _DATA_END, _TRAILERS = -1, -2, -3


class _Connection:
    __slots__ = ("stream", "socket", "idle_since")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = socket
        self.idle_since = 0.0

    def close(self) -> None:
        """Close at once, without a TLS close_notify (an abort, as
        `trio.aclose_forcefully` does, but synchronous)."""
        self.socket.close()

    def usable(self, now: float, expiry: float) -> bool:
        if now - self.idle_since > expiry:
            return False
        try:
            # An idle HTTP/1.1 connection has nothing to read unless the server
            # closed it (or broke the protocol): either way it is not reusable.
            return not self.socket.is_readable()
        except OSError:
            return False


class Response:
    """The status and headers of a response, and its body as it arrives.

    `headers` maps lower-case names to values (repeated headers joined by ", ").
    """

    __slots__ = (
        "status",
        "reason",
        "http_version",
        "headers",
        "_client",
        "_connection",
        "_buffer",
        "_pos",
        "_framing",
        "_left",
        "_done",
        "_keep_alive",
    )

    def __init__(self, client: HTTPClient, connection: _Connection) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self._buffer = b""
        self._pos = 0
        self._done = False
        self._left = 0
        self._framing = _LENGTH
        self._keep_alive = True
        self.status = 0
        self.reason = ""
        self.http_version = ""
        self.headers: dict[str, str] = {}

    @property
    def complete(self) -> bool:
        """Whether the whole body has been received."""
        return self._done

    async def receive(self) -> bytes:
        """The body bytes that have arrived since the last call (waiting for
        some), or `b""` once the body is complete."""
        while True:
            if self._done:
                return b""
            data = self._decode()
            if self._pos >= len(self._buffer):
                # All consumed: hold no bytes while the stream waits for more.
                self._buffer, self._pos = b"", 0
            if data or self._done:
                return data
            await self._fill()

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body, or its first `limit` bytes (the rest is then left
        unread, and the connection is closed when the response is)."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            data = await self.receive()
            if not data:
                break
            parts.append(data)
            size += len(data)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    # -- reading --------------------------------------------------------------

    async def _fill(self) -> None:
        connection = self._connection
        assert connection is not None, "the response is closed"
        with trio.move_on_after(self._client.read_timeout) as scope:
            try:
                data = await connection.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                raise ReadError(f"the connection broke while reading the response ({_describe(exc)})") from exc
        if scope.cancelled_caught:
            raise ReadTimeout(f"no response bytes within {self._client.read_timeout:g} s")
        if not data:
            if self._framing == _UNTIL_CLOSE and self.status:
                self._done = True
                self._keep_alive = False
                return
            raise ReadError("the server closed the connection before the response was complete")
        if self._pos < len(self._buffer):
            self._buffer = self._buffer[self._pos :] + data
        else:
            self._buffer = data
        self._pos = 0

    async def _read_head(self) -> None:
        """Read the status line and headers (skipping 1xx responses), and choose
        the body's framing."""
        while True:
            end = self._buffer.find(b"\r\n\r\n", self._pos)
            while end < 0:
                if len(self._buffer) - self._pos > self._client.max_header_bytes:
                    raise ProtocolError(f"the response headers are longer than {self._client.max_header_bytes} bytes")
                await self._fill()
                end = self._buffer.find(b"\r\n\r\n", self._pos)
            head = self._buffer[self._pos : end]
            self._pos = end + 4
            self._parse_head(head)
            if not 100 <= self.status < 200:
                break
            self.headers = {}  # an interim response (100 Continue, 103 Early Hints)
        headers = self.headers
        connection = headers.get("connection", "").lower()
        if self.http_version == "HTTP/1.1":
            self._keep_alive = "close" not in connection
        else:
            self._keep_alive = "keep-alive" in connection
        if self.status in (204, 304):
            self._framing, self._left = _LENGTH, 0
        elif "transfer-encoding" in headers:
            codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
            if codings[-1] == "chunked":
                self._framing, self._left = _CHUNKED, _SIZE_LINE
            else:
                self._framing, self._keep_alive = _UNTIL_CLOSE, False
        elif "content-length" in headers:
            value = headers["content-length"].split(",")[0].strip()
            if not value.isdigit():
                raise ProtocolError(f"invalid Content-Length {headers['content-length']!r}")
            self._framing, self._left = _LENGTH, int(value)
        else:
            self._framing, self._keep_alive = _UNTIL_CLOSE, False
        if self._framing == _LENGTH and self._left == 0:
            self._done = True

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        self.http_version = parts[0].decode("ascii", "replace")
        self.status = int(parts[1])
        self.reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise ProtocolError(f"malformed response header line: {line[:100]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers = headers

    def _decode(self) -> bytes:
        """The body bytes in the buffer, according to the framing."""
        buffer, pos = self._buffer, self._pos
        available = len(buffer) - pos
        if self._framing == _UNTIL_CLOSE:
            self._pos = len(buffer)
            return buffer[pos:] if pos else buffer
        if self._framing == _LENGTH:
            if not available:
                return b""
            n = min(available, self._left)
            self._left -= n
            self._pos = pos + n
            if not self._left:
                self._done = True
            return buffer[pos : pos + n] if (pos or n != len(buffer)) else buffer
        parts: list[bytes] = []
        left = self._left
        while True:
            if left > 0:
                if pos >= len(buffer):
                    break
                n = min(len(buffer) - pos, left)
                parts.append(buffer[pos : pos + n])
                pos += n
                left -= n
                if left:
                    break
                left = _DATA_END
            elif left == _SIZE_LINE:
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    if len(buffer) - pos > _MAX_LINE:
                        raise ProtocolError("a chunk-size line is too long")
                    break
                size_text = buffer[pos:end].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"invalid chunk size {size_text[:40]!r}") from None
                if size < 0:
                    raise ProtocolError(f"invalid chunk size {size_text[:40]!r}")
                pos = end + 2
                left = size if size else _TRAILERS
            elif left == _DATA_END:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("a chunk's data is not followed by CRLF")
                pos += 2
                left = _SIZE_LINE
            else:  # _TRAILERS: header lines until an empty one
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    if len(buffer) - pos > self._client.max_header_bytes:
                        raise ProtocolError("the response trailers are too long")
                    break
                line_empty = end == pos
                pos = end + 2
                if line_empty:
                    self._done = True
                    break
        self._left = left
        self._pos = pos
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- ending ---------------------------------------------------------------

    def _release(self, failed: bool = False) -> None:
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        reusable = not failed and self._done and self._keep_alive and self._pos >= len(self._buffer)
        self._client._release(connection, reusable)


class _StreamContext:
    """`async with client.stream(...) as response`: no generator machinery on the
    hot path, and an exit that never awaits (safe in an async generator's
    `aclose()` and under cancellation)."""

    __slots__ = ("_client", "_request", "_response")

    def __init__(self, client: HTTPClient, request: bytes) -> None:
        self._client = client
        self._request = request
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        self._response = await self._client._send(self._request)
        return self._response

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        # A block left by an exception (a malformed stream, a bound, an error
        # status raised as an error) does not return its connection to the
        # pool: whatever the server sent next on it is not trusted.
        if self._response is not None:
            self._response._release(failed=exc_type is not None)


class HTTPClient:
    """A pooled HTTP/1.1 client for one origin (see the module's docstring).

    `base_url` is `http://` or `https://`, host, optional port and an optional
    base path that request paths are appended to. `headers` are sent with every
    request.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        write_timeout: float = 30.0,
        pool_timeout: float = 10.0,
        max_connections: int = 512,
        max_idle: int = 64,
        idle_expiry: float = 4.0,
        verify: bool = True,
        ca_file: str | None = None,
        max_header_bytes: int = 64 * 1024,
        connect_to: str | None = None,
    ) -> None:
        url = check_base_url(base_url)
        #: The address connections go to, when set (contract 1.5): the host of
        #: `base_url` is then only the Host header and TLS's server name, so a
        #: caller that resolved and checked the name itself (an SSRF guard)
        #: connects to exactly the address it checked.
        self.connect_to = connect_to
        self.base_url = base_url
        self.host = url.hostname
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.base_path = url.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.pool_timeout = pool_timeout
        self.max_connections = max_connections
        self.max_idle = min(max_idle, max_connections)
        self.idle_expiry = idle_expiry
        self.max_header_bytes = max_header_bytes
        self.ssl_context: ssl.SSLContext | None = None
        if self.tls:
            context = ssl.create_default_context(cafile=ca_file)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            self.ssl_context = context
        default_port = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == default_port else f"{host}:{self.port}"
        items = list(headers.items()) if isinstance(headers, dict) else list(headers)
        names = {name.lower() for name, _ in items}
        lines = [] if "host" in names else [("Host", authority)]
        lines += items
        if "user-agent" not in names:
            lines.append(("User-Agent", "streamvisor"))
        self._header_block = b"".join(_header_line(name, value) for name, value in lines)
        self._slots = trio.Semaphore(max_connections)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False
        #: Connections opened so far (a reused one is not counted again).
        self.connections_opened = 0

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def active_connections(self) -> int:
        return self.max_connections - self._slots.value

    def stream(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
    ) -> _StreamContext:
        """`async with client.stream("POST", "chat/completions", body=...) as
        response:` sends the request and returns once the response headers are
        in; the body is read with `response.receive()` inside the block."""
        return _StreamContext(self, self._encode(method, path, body, headers))

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | Iterable[tuple[str, str]] = (),
        max_body: int = 16 * 1024 * 1024,
    ) -> tuple[Response, bytes]:
        """A whole request: the response and its body (at most `max_body` bytes;
        a longer body is a `ProtocolError`)."""
        async with self.stream(method, path, body=body, headers=headers) as response:
            content = await response.read(max_body + 1)
            if len(content) > max_body:
                raise ProtocolError(f"the response body is longer than {max_body} bytes")
            return response, content

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their
        responses end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        await trio.lowlevel.checkpoint()

    # -- internals ------------------------------------------------------------

    def _encode(self, method: str, path: str, body: bytes, headers: dict[str, str] | Iterable[tuple[str, str]]) -> bytes:
        if not path.startswith("/"):
            path = "/" + path
        target = self.base_path + path
        if any(c in target for c in " \r\n") or not method.isalpha():
            raise ValueError(f"invalid request line: {method} {target!r}")
        items = headers.items() if isinstance(headers, dict) else headers
        extra = b"".join(_header_line(name, value) for name, value in items)
        length = b"Content-Length: %d\r\n" % len(body) if body or method in ("POST", "PUT", "PATCH") else b""
        return b"".join(
            (method.encode("ascii"), b" ", target.encode("utf-8"), b" HTTP/1.1\r\n", self._header_block, extra, length, b"\r\n", body)
        )

    async def _send(self, request: bytes) -> Response:
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        await self._acquire_slot()
        connection: _Connection | None = None
        try:
            connection = self._reuse() or await self._connect()
            response = Response(self, connection)
            with trio.move_on_after(self.write_timeout) as scope:
                try:
                    await connection.stream.send_all(request)
                except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    raise WriteError(f"the connection broke while sending the request ({_describe(exc)})") from exc
            if scope.cancelled_caught:
                raise WriteTimeout(f"the request was not sent within {self.write_timeout:g} s")
            await response._read_head()
            return response
        except BaseException:
            if connection is not None:
                connection.close()
            self._slots.release()
            raise

    async def _acquire_slot(self) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.pool_timeout) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"all {self.max_connections} connections to {self.host}:{self.port} stayed busy for {self.pool_timeout:g} s"
                ) from None

    def _reuse(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self.idle_expiry):
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        tcp: trio.SocketStream | None = None
        with trio.move_on_after(self.connect_timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(self.connect_to or self.host, self.port)
            except OSError as exc:
                raise ConnectError(f"cannot connect to {self.host}:{self.port} ({_describe(exc)})") from exc
            stream: trio.abc.Stream = tcp
            if self.ssl_context is not None:
                stream = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.host, https_compatible=True)
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    tcp.socket.close()
                    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
                    raise ConnectError(f"TLS handshake with {self.host}:{self.port} failed ({_describe(cause)})") from exc
                except BaseException:
                    tcp.socket.close()
                    raise
        if scope.cancelled_caught or tcp is None:
            if tcp is not None:
                tcp.socket.close()
            raise ConnectTimeout(f"no connection to {self.host}:{self.port} within {self.connect_timeout:g} s")
        self.connections_opened += 1
        return _Connection(stream, tcp.socket)

    def _release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        idle = self._idle
        if not reusable or self._closed:
            connection.close()
            return
        now = time.monotonic()
        connection.idle_since = now
        idle.append(connection)
        # Drop what the pool will not reuse: the oldest beyond `max_idle`, and
        # expired ones (the oldest are on the left).
        while len(idle) > self.max_idle or now - idle[0].idle_since > self.idle_expiry:
            idle.popleft().close()


def check_base_url(base_url: str, name: str = "the upstream URL") -> SplitResult:
    """`base_url` parsed, or a ValueError that says what is wrong with it (calling
    it `name`): `http://` or `https://`, a host, a numeric port if any, no query
    or fragment. Configuration validates with it too."""
    try:
        url = urlsplit(base_url)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{name}: {exc} in {base_url!r}") from None
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ValueError(f"{name} must be an http:// or https:// URL with a host (like http://127.0.0.1:8000/v1), got {base_url!r}")
    return url


def check_header(name: str, value: str) -> None:
    """A ValueError unless `name: value` can be sent as one header line."""
    if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid header {name!r} (names without spaces or colons, values on one line)")


def _header_line(name: str, value: str) -> bytes:
    check_header(name, value)
    return f"{name}: {value}\r\n".encode("latin-1")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
