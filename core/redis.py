"""A small Redis client on trio sockets, public to plugins (contract 1.3) as
`streamvisor.hooks.RespClient`: the keys plugin's limits and the cluster plugin
use it, and a third party's plugin may.

Why not coredis, which the cache plugin uses? Measured on this machine, one
`EVAL` through coredis cost the gateway about 0.65 ms of CPU; the same call on
a plain trio socket about 0.09 ms. The limits make one or two calls per
request, so at concurrency 32 coredis alone cost more than the 10 % the keys
plugin may cost in all (docs/performance.md, "Keys").

What it does: RESP2 commands (`execute`) and pipelines of them (`pipeline`) on a pool of connections (each used by one caller
at a time, so replies never need matching), `EVALSHA` of scripts loaded on
first use (and again after `NOSCRIPT`, when Redis restarted), `AUTH` and
`SELECT` from the URL, TLS for `rediss://`. A connection on which anything
went wrong (an error, a timeout, a cancellation mid-reply) is closed, never
reused: its next reply could belong to the call that was cut off.
"""

from __future__ import annotations

import hashlib
import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence
from urllib.parse import unquote, urlsplit

import trio

#: The bound on one reply (and so on a connection's buffer).
MAX_REPLY_BYTES = 1 << 20


class RedisError(Exception):
    """Redis answered with an error."""


class Script:
    """A Lua script, run with `RespClient.run` by its SHA1 (loaded when needed)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0

    async def _fill(self) -> None:
        if len(self.buf) - self.pos > MAX_REPLY_BYTES:
            raise ConnectionError(f"a Redis reply is larger than {MAX_REPLY_BYTES} bytes")
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("Redis closed the connection")
        self.buf += data

    async def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return line
            await self._fill()

    async def _exact(self, size: int) -> bytes:
        while len(self.buf) - self.pos < size + 2:
            await self._fill()
        data = bytes(self.buf[self.pos : self.pos + size])
        self.pos += size + 2
        return data

    async def _reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else await self._exact(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self._reply() for _ in range(count)]
        raise ConnectionError(f"not a Redis reply: {line[:40]!r}")

    async def call(self, payload: bytes) -> Any:
        await self.stream.send_all(payload)
        return await self.reply()

    async def reply(self) -> Any:
        """The next reply; an error reply raises `RedisError`."""
        reply = await self._reply()
        del self.buf[: self.pos]
        self.pos = 0
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def replies(self, payload: bytes, count: int) -> list[Any]:
        """Send a pipeline and read its `count` replies; an error reply is in
        the list as a `RedisError`, not raised (the others still count)."""
        await self.stream.send_all(payload)
        out = []
        for _ in range(count):
            out.append(await self._reply())
        del self.buf[: self.pos]
        self.pos = 0
        return out


class Connection:
    """A connection of its own, out of the pool, for what holds a connection:
    a blocking read (`XREAD BLOCK`) or a subscription. No timeout applies but
    the caller's; a failure closes it for good."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def execute(self, *args: Any) -> Any:
        return await self._connection.call(_encode(args))

    async def send(self, *args: Any) -> None:
        await self._connection.stream.send_all(_encode(args))

    async def reply(self) -> Any:
        """The next reply (a message, on a subscribed connection)."""
        return await self._connection.reply()


class RespClient:
    """Connections to one Redis, at most `max_connections` of them."""

    def __init__(self, url: str, timeout: float, max_connections: int = 32) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"expected a redis:// or rediss:// URL, got {url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self._idle: list[_Connection] = []
        #: Connections open or being opened, at most `_max`; a caller that finds
        #: none idle and no room waits for one to be given back.
        self._open = 0
        self._max = max_connections
        self._returned = trio.Event()
        self._loaded: set[bytes] = set()
        self.closed = False

    async def _connect(self) -> _Connection:
        if self.tls:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(self.host, self.port, ssl_context=ssl.create_default_context())
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
        connection = _Connection(stream)
        try:
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                await connection.call(_encode(auth))
            if self.db:
                await connection.call(_encode(("SELECT", self.db)))
        except RedisError as exc:  # a wrong password, an unknown database
            await trio.aclose_forcefully(stream)
            raise ConnectionError(f"Redis refused the connection: {exc}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return connection

    async def execute(self, *args: Any) -> Any:
        """One command and its reply, within the timeout; `RedisError` for an
        error reply, `ConnectionError` or `trio.TooSlowError` when Redis cannot
        be reached in time."""
        return await self._exchange(_encode(args), 0)

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one round trip, on one connection, within the
        timeout. Their replies come back in order; an error reply is a
        `RedisError` in the list (Redis ran the others all the same)."""
        if not commands:
            return []
        return await self._exchange(b"".join(_encode(tuple(command)) for command in commands), len(commands))

    async def _exchange(self, payload: bytes, count: int) -> Any:
        """Send `payload` on a pooled connection and read one reply (`count`
        0, an error reply raised) or `count` replies (a list)."""
        if self.closed:
            raise ConnectionError("the Redis client is closed")
        # An idle connection is taken without a checkpoint: a semaphore's
        # acquire yields to the scheduler, which cost as much as the send.
        while not self._idle and self._open >= self._max:
            await self._returned.wait()
        connection = self._idle.pop() if self._idle else None
        if connection is None:
            self._open += 1
        try:
            with trio.fail_after(self.timeout):
                if connection is None:
                    connection = await self._connect()
                reply = await (connection.call(payload) if count == 0 else connection.replies(payload, count))
        except RedisError:
            assert connection is not None
            await self._give_back(connection)  # a whole reply was read: still in step
            raise
        except BaseException:
            await self._drop(connection)
            raise
        await self._give_back(connection)
        return reply

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of its own (not from the pool, not counted in it),
        closed on leaving: for blocking commands and subscriptions. Opening it
        takes at most the timeout."""
        with trio.fail_after(self.timeout):
            connection = await self._connect()
        try:
            yield Connection(connection)
        finally:
            await trio.aclose_forcefully(connection.stream)

    async def _give_back(self, connection: _Connection) -> None:
        if self.closed:
            await self._drop(connection)
            return
        self._idle.append(connection)
        self._wake()

    async def _drop(self, connection: _Connection | None) -> None:
        self._open -= 1
        self._wake()
        if connection is not None:
            await trio.aclose_forcefully(connection.stream)

    def _wake(self) -> None:
        event, self._returned = self._returned, trio.Event()
        event.set()

    async def run(self, script: Script, *args: Any) -> Any:
        """`EVALSHA` of a script with no keys (it names its keys from ARGV);
        loaded first when this client has not, or Redis lost it."""
        if script.sha not in self._loaded:
            await self.execute("SCRIPT", "LOAD", script.source)
            self._loaded.add(script.sha)
        try:
            return await self.execute("EVALSHA", script.sha, 0, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            self._loaded.discard(script.sha)
            await self.execute("SCRIPT", "LOAD", script.source)
            self._loaded.add(script.sha)
            return await self.execute("EVALSHA", script.sha, 0, *args)

    async def aclose(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)
