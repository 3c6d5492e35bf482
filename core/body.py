"""Request bodies: each route's size limit, and reading a body as a stream
with backpressure instead of holding it.

quart keeps what the client sent in a buffer that its receiving task fills as
fast as the network allows, and checks its size limit against that buffer,
not against what was received in all: a view that reads the body as a stream
would let a client past any limit, and a view slower than the network would
let the buffer grow to the whole body. So core replaces the body:

- Its limit is the route's: `[server] max_body_bytes`, or the `max_body_bytes`
  a plugin registered the route with. Before the route is known (the body
  starts arriving with the headers) it is the largest of them, and nothing is
  held past a small window meanwhile.
- It counts every byte received: past the limit, the next read raises 413,
  whether the body is read whole or as a stream.
- A view that reads it whole (`read_json()`, `request.get_data()`) lets it
  buffer up to the limit, as before. One that reads it as a stream
  (`body_chunks()`) holds at most `WINDOW` bytes: while the window is full the
  connection's receiving task stops asking hypercorn for more, hypercorn stops
  reading the socket, and the client is slowed down by TCP instead of filling
  the server's memory.
"""

from __future__ import annotations

from typing import Any, Generator

import trio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

#: What a body read as a stream (or not read yet) holds at most before the
#: client is made to wait; one network read may go past it.
WINDOW = 256 * 1024


class RequestBody(TrioBody):
    """A body bounded by what was received in all, with a window while it is
    read as a stream. A reader gets the body up to the limit, then the 413."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._expected = expected_content_length
        self._received = 0
        #: More came than the limit: what fits is still read, then the 413.
        self._overflow = False
        self._whole = False
        self._room = trio.Event()
        self._room.set()

    def limit_to(self, limit: int | None) -> None:
        """The route's limit, once the route is known: a `Content-Length`
        past it is refused at the first read, before any of the body is."""
        self._max_content_length = limit
        too_large = limit is not None and ((self._expected is not None and self._expected > limit) or self._received > limit)
        if too_large:
            self._must_raise = RequestEntityTooLarge()
            self._data.clear()
            self.set_complete()
        elif isinstance(self._must_raise, RequestEntityTooLarge):
            # Refused against the largest limit while the route was not known:
            # this route's is what counts.
            self._must_raise = None

    @property
    def received(self) -> int:
        """Bytes of the body received so far."""
        return self._received

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None or self._overflow:
            return
        self._received += len(data)
        limit = self._max_content_length
        if limit is not None and self._received > limit:
            self._overflow = True
            fits = len(data) - (self._received - limit)
            if fits > 0:
                self._data.extend(data[:fits])
            self.set_complete()
            return
        self._data.extend(data)
        self._has_data.set()
        if not self._whole and len(self._data) >= WINDOW and self._room.is_set():
            self._room = trio.Event()

    def set_complete(self) -> None:
        super().set_complete()
        self._room.set()

    async def __anext__(self) -> bytes:
        if self._must_raise is not None:
            raise self._must_raise
        if not self._complete.is_set():
            await self._has_data.wait()
        if not self._data:
            if self._overflow:
                self._must_raise = RequestEntityTooLarge()
                raise self._must_raise
            if self._complete.is_set():
                raise StopAsyncIteration
        data = bytes(self._data)
        self._data.clear()
        self._has_data.clear()
        self._room.set()
        return data

    def __await__(self) -> Generator[Any, None, Any]:
        # Read whole: it may buffer up to the limit.
        self._whole = True
        self._room.set()
        if self._must_raise is not None:
            raise self._must_raise
        yield from self._complete.wait().__await__()
        if self._overflow:
            self._must_raise = RequestEntityTooLarge()
        if self._must_raise is not None:
            raise self._must_raise
        return bytes(self._data)

    async def wait_room(self) -> None:
        """Until the window has room (the receiving task waits here)."""
        if not self._room.is_set():
            await self._room.wait()


class BoundedRequest(TrioRequest):
    body_class = RequestBody


class BoundedHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's connection, whose receiving task asks for the next piece
    of the body only when the body has room for it."""

    async def handle_messages(self, nursery: trio.Nursery, request: Any, receive: Any) -> None:  # type: ignore[override]
        body = request.body
        while True:
            if isinstance(body, RequestBody):
                await body.wait_room()
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()
