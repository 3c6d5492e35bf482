"""The upstream HTTP/1.1 client (streamvisor.core.httpclient) against real
loopback servers that answer byte by byte, stall, close, lie or speak TLS."""

from __future__ import annotations

import functools
import ssl
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trustme

from streamvisor.core import httpclient
from streamvisor.core.httpclient import HTTPClient

from streamvisor.testing import closed_port

Handler = Callable[[trio.abc.Stream, "Server"], Awaitable[None]]


class Server:
    """A loopback TCP server running `handler(stream, server)` per connection;
    records the raw requests it read and when each connection saw EOF."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.eof = trio.Event()

    async def read_request(self, stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data
        head_end = buffer.index(b"\r\n\r\n") + 4
        head = bytes(buffer[:head_end])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(buffer) < head_end + length:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data
        request = bytes(buffer[: head_end + length])
        del buffer[: head_end + length]
        self.requests.append(request)
        return request

    async def wait_eof(self, stream: trio.abc.Stream) -> None:
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        self.eof.set()


@asynccontextmanager
async def serve(handler: Handler, tls: trustme.CA | None = None) -> AsyncIterator[tuple[str, Server]]:
    server = Server()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.issue_cert("localhost", "127.0.0.1").configure_cert(context)

    async def per_connection(stream: trio.abc.Stream) -> None:
        server.connections += 1
        if context is not None:
            stream = trio.SSLStream(stream, context, server_side=True)
        try:
            await handler(stream, server)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, per_connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield (f"https://localhost:{port}/v1" if tls else f"http://127.0.0.1:{port}/v1"), server
        nursery.cancel_scope.cancel()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def keep_alive(*responses: bytes, byte_by_byte: bool = False) -> Handler:
    """Answer each request on the connection with the next response (the last
    one repeats)."""

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        buffer = bytearray()
        index = 0
        while await server.read_request(stream, buffer) is not None:
            response = responses[min(index, len(responses) - 1)]
            index += 1
            if byte_by_byte:
                for i in range(len(response)):
                    await stream.send_all(response[i : i + 1])
                    await trio.sleep(0)
            else:
                await stream.send_all(response)

    return handler


SSE = chunked(b'data: {"a": 1}\n\n', b"data: [DONE]\n\n")
OK_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + SSE


async def body_of(client: HTTPClient, path: str = "chat/completions", body: bytes = b"{}") -> tuple[httpclient.Response, bytes]:
    return await client.request("POST", path, body=body)


async def test_request_is_well_formed_and_the_base_path_is_kept():
    async with serve(keep_alive(OK_CHUNKED)) as (url, server):
        client = HTTPClient(url, headers={"Authorization": "Bearer k", "Accept": "text/event-stream"})
        response, body = await client.request("POST", "chat/completions", body=b'{"x":1}', headers={"Content-Type": "application/json"})
        assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
        assert body == b'data: {"a": 1}\n\ndata: [DONE]\n\n'
        head, _, sent_body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        assert headers[b"Host"] == url.split("//")[1].split("/")[0].encode()
        assert headers[b"Authorization"] == b"Bearer k"
        assert headers[b"Content-Type"] == b"application/json"
        assert headers[b"Content-Length"] == b"7" and sent_body == b'{"x":1}'
        await client.aclose()


async def test_a_body_split_at_every_byte_is_decoded_and_the_connection_reused():
    response_bytes = OK_CHUNKED[:-5] + b"0\r\nX-Trailer: yes\r\n\r\n"  # with a trailer
    async with serve(keep_alive(response_bytes, byte_by_byte=True)) as (url, server):
        client = HTTPClient(url)
        for _ in range(3):
            response, body = await body_of(client)
            assert body == b'data: {"a": 1}\n\ndata: [DONE]\n\n'
        assert server.connections == 1 and client.connections_opened == 1
        assert client.idle_connections == 1 and client.active_connections == 0


async def test_content_length_and_read_until_close_bodies():
    with_length = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"

    async def handler(stream: trio.abc.Stream, server: Server) -> None:
        buffer = bytearray()
        await server.read_request(stream, buffer)
        await stream.send_all(with_length)
        await server.read_request(stream, buffer)
        await stream.send_all(until_close)  # then close: the body ends with the connection

    async with serve(handler) as (url, server):
        client = HTTPClient(url)
        assert (await body_of(client))[1] == b"hello"
        response, body = await body_of(client)
        assert body == b"all of it" and response.http_version == "HTTP/1.0"
        assert client.idle_connections == 0  # not reusable after a read-until-close body
        assert (await body_of(client))[1] == b"hello"
        assert server.connections == 2


async def test_connection_close_is_honoured():
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with serve(keep_alive(closing)) as (url, server):
        client = HTTPClient(url)
        for _ in range(2):
            assert (await body_of(client))[1] == b"ok"
        assert client.connections_opened == 2 and client.idle_connections == 0


async def test_interim_1xx_responses_are_skipped():
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    async with serve(keep_alive(answer)) as (url, _):
        response, body = await body_of(HTTPClient(url))
        assert response.status == 201 and body == b"ok" and "link" not in response.headers


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def one_then_close(stream: trio.abc.Stream, server: Server) -> None:
        buffer = bytearray()
        await server.read_request(stream, buffer)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # keep-alive promised, but the server closes the idle connection

    async with serve(one_then_close) as (url, server):
        client = HTTPClient(url)
        assert (await body_of(client))[1] == b"ok"
        await trio.sleep(0.05)  # the close reaches the client
        assert (await body_of(client))[1] == b"ok"  # a fresh connection, no error
        assert client.connections_opened == 2


async def test_idle_connections_expire_and_the_pool_keeps_at_most_max_idle():
    async with serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (url, _):
        client = HTTPClient(url, idle_expiry=0.1, max_idle=2)
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(body_of, client)
        assert client.connections_opened >= 2 and client.idle_connections <= 2
        opened = client.connections_opened
        await trio.sleep(0.2)
        await body_of(client)
        assert client.connections_opened == opened + 1  # the idle ones had expired


async def test_read_timeout_between_chunks_closes_the_connection():
    async def stall(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await server.wait_eof(stream)

    async with serve(stall) as (url, server):
        client = HTTPClient(url, read_timeout=0.2)
        async with client.stream("POST", "chat/completions", body=b"{}") as response:
            assert await response.receive() == b"first"
            t0 = trio.current_time()
            with pytest.raises(httpclient.ReadTimeout, match="no response bytes within 0.2 s"):
                await response.receive()
            assert 0.15 < trio.current_time() - t0 < 2
        with trio.fail_after(2):
            await server.eof.wait()
        assert client.active_connections == 0 and client.idle_connections == 0


async def test_cancelling_mid_body_closes_the_connection_at_once():
    async def endless(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.wait_eof, stream)
            while not server.eof.is_set():
                await stream.send_all(chunked(b"data: x\n\n")[:-5])
                await trio.sleep(0.01)

    async with serve(endless) as (url, server):
        client = HTTPClient(url)
        received = 0
        with trio.move_on_after(0.2):
            async with client.stream("POST", "chat/completions", body=b"{}") as response:
                while await response.receive():
                    received += 1
        assert received > 3
        with trio.fail_after(1):
            await server.eof.wait()
        assert client.active_connections == 0 and client.idle_connections == 0


async def test_pool_limit_waits_then_times_out():
    release = trio.Event()

    async def slow(stream: trio.abc.Stream, server: Server) -> None:
        buffer = bytearray()
        while await server.read_request(stream, buffer) is not None:
            await release.wait()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serve(slow) as (url, server):
        client = HTTPClient(url, max_connections=1, pool_timeout=0.2)
        results = []

        async def one() -> None:
            results.append((await body_of(client))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.sleep(0.05)
            with pytest.raises(httpclient.PoolTimeout, match="all 1 connections"):
                await body_of(client)
            nursery.start_soon(one)  # waits for the slot, then reuses the connection
            await trio.sleep(0.05)
            release.set()
        assert results == [b"ok", b"ok"] and server.connections == 1


async def test_connect_errors_and_timeouts():
    client = HTTPClient(f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(httpclient.ConnectError, match="cannot connect to 127.0.0.1"):
        await body_of(client)
    assert client.active_connections == 0

    async def silent(stream: trio.abc.Stream, server: Server) -> None:
        await server.wait_eof(stream)  # accepts TCP, never answers the TLS hello

    async with serve(silent) as (url, _):
        port = url.rsplit(":", 1)[1].split("/")[0]
        client = HTTPClient(f"https://127.0.0.1:{port}", connect_timeout=0.2)
        with pytest.raises(httpclient.ConnectTimeout, match="within 0.2 s"):
            await body_of(client)


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\n bad fold\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, "headers are longer than"),
    ],
)
async def test_malformed_responses_are_protocol_errors(answer: bytes, message: str):
    async with serve(keep_alive(answer)) as (url, _):
        client = HTTPClient(url)
        with pytest.raises(httpclient.ProtocolError, match=message):
            await body_of(client)
        assert client.active_connections == 0 and client.idle_connections == 0


async def test_a_body_cut_short_is_a_read_error():
    async def cut(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")

    async with serve(cut) as (url, _):
        with pytest.raises(httpclient.ReadError, match="before the response was complete"):
            await body_of(HTTPClient(url))


async def test_tls_with_a_trusted_ca_and_an_untrusted_one(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with serve(keep_alive(OK_CHUNKED), tls=ca) as (url, server):
        client = HTTPClient(url, ca_file=str(ca_file))
        for _ in range(2):
            response, body = await body_of(client)
            assert response.status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert client.connections_opened == 1
        await client.aclose()

        untrusted = HTTPClient(url)  # the system CAs do not know this one
        with pytest.raises(httpclient.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await body_of(untrusted)
        unverified = HTTPClient(url, verify=False)
        assert (await body_of(unverified))[0].status == 200


def test_bad_urls_and_header_injection_are_refused():
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPClient("ftp://example.com")
    with pytest.raises(ValueError, match="invalid header"):
        HTTPClient("http://127.0.0.1:1", headers={"X-Evil": "a\r\nHost: b"})
    client = HTTPClient("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="invalid request line"):
        client.stream("POST", "x y")
