"""Sessions on other instances, as the session routes see them (`RemoteSession`),
and the one blocking reader that tells local followers when a remote stream grew."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

import attrs
import orjson
import trio

from streamvisor.hooks import INTERRUPTED, APIError, StoredSession

from . import wire

if TYPE_CHECKING:
    from . import ClusterPlugin

log = logging.getLogger("streamvisor.cluster")

#: Entries read per XRANGE while following.
PAGE = 200


@attrs.define(eq=False)
class Remote:
    """A session that another instance runs (or ran and still holds), or one
    whose instance died and whose published chunks are left (`orphan`)."""

    plugin: "ClusterPlugin"
    id: str
    owner: str
    info: dict[str, Any]
    identity: str
    team: str | None
    model: str
    created_at: float
    include_usage: bool
    published: bool = False
    orphan: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.info)

    async def stop(self) -> tuple[bool, dict[str, Any]]:
        if self.orphan:
            return False, self.to_json()
        delivered, reply = await self.plugin.ask(self.owner, "stop", self.id)
        if not delivered or reply is None or "session" not in reply:
            return delivered, self.to_json()
        return True, reply["session"]

    async def delete(self) -> bool:
        if self.orphan:
            return False
        delivered, reply = await self.plugin.ask(self.owner, "delete", self.id)
        return bool(delivered and reply and reply.get("deleted"))

    async def completion(self) -> dict[str, Any]:
        if not self.orphan:
            delivered, reply = await self.plugin.ask(self.owner, "completion", self.id)
            if delivered and reply and "completion" in reply:
                return reply["completion"]
            if delivered and reply and "error" in reply:
                raise APIError(reply["error"], status=410, type="invalid_request_error", code="session_gone")
        raise APIError(
            f"The output of session '{self.id}' cannot be had: the instance running it ({self.owner}) does not answer.",
            status=503,
            type="server_error",
            code="instance_unavailable",
        )

    def _stored(self, end: dict[str, Any] | None, chunks: int) -> StoredSession:
        info = self.info
        if end is None:  # its instance died before it ended
            state, finish_reason, usage, error = INTERRUPTED, None, None, None
        else:
            state, finish_reason, usage, error = end["state"], end.get("finish_reason"), wire.usage_of(end.get("usage")), end.get("error")
        return StoredSession(
            id=self.id,
            request_id=info.get("request_id", ""),
            identity=self.identity,
            model=self.model,
            provider=info.get("provider", ""),
            state=state,
            created_at=self.created_at,
            finish_reason=finish_reason,
            usage=usage,
            error=error,
            chunks=chunks,
            background=bool(info.get("background")),
            include_usage=self.include_usage,
            team=self.team,
            key_id=info.get("key_id"),
        )

    async def follow(self, offset: int, keepalive: float) -> AsyncIterator[Any]:
        plugin = self.plugin
        client = plugin.client
        key = plugin.key("chunks", self.id)
        if not self.published and not self.orphan:
            delivered, reply = await plugin.ask(self.owner, "publish", self.id)
            if delivered and reply and reply.get("whole") is False and plugin.runtime.store is not None:
                # Finished, and its buffer let go on its owner: the store has it.
                async for item in self._replay(offset):
                    yield item
                return
            if not delivered or not reply or not reply.get("published"):
                why = (reply or {}).get("error") or f"the instance running it ({self.owner}) did not answer"
                yield APIError(f"Session '{self.id}' cannot be followed from here: {why}.", status=503, type="server_error", code="instance_unavailable")
                return
        try:
            # The entry holding `offset`: the last one whose first offset is at most it.
            before = await client.execute("XREVRANGE", key, wire.entry_id(offset), "-", "COUNT", 1)
            cursor = before[0][0] if before else b"-"
            inclusive = True
        except Exception as exc:
            yield plugin.unavailable(exc)
            return
        produced = offset
        watch = plugin.reader.watch(key, cursor) if not self.orphan else None
        idle = 0.0
        check_every = max(0.5, plugin.settings.dead_after_seconds / 4)
        since_check = 0.0
        try:
            while True:
                try:
                    # Nothing read yet ("-"): from the first entry there is.
                    start = cursor if inclusive or cursor == b"-" else b"(" + cursor
                    entries = await client.execute("XRANGE", key, start, "+", "COUNT", PAGE)
                except Exception as exc:
                    yield plugin.unavailable(exc)
                    return
                inclusive = False
                for entry_id, raw in entries:
                    cursor = entry_id
                    data = wire.fields(raw)
                    first = wire.first_offset(entry_id)
                    if b"end" in data:
                        yield self._stored(orjson.loads(data[b"end"]), max(first, produced))
                        return
                    deltas = wire.decode_deltas(data[b"d"])
                    if first > offset:
                        yield APIError(
                            f"Chunks {offset} to {first - 1} of session '{self.id}' are no longer kept (max_stream_entries).",
                            status=410,
                            type="invalid_request_error",
                            code="session_gone",
                        )
                        return
                    if first + len(deltas) > offset:
                        yield offset, deltas[offset - first :]
                        offset = first + len(deltas)
                    produced = max(produced, first + len(deltas))
                    idle = 0.0
                if len(entries) == PAGE:
                    continue
                if self.orphan:
                    # Nothing more will come: what it had produced, then its end.
                    yield self._stored(None, produced)
                    return
                assert watch is not None
                wait = min(keepalive - idle, check_every - since_check)
                with trio.move_on_after(max(0.01, wait)):
                    await watch.wait()
                    continue
                idle += wait
                since_check += wait
                if since_check >= check_every:
                    since_check = 0.0
                    if not await plugin.alive(self.owner):
                        self.orphan = True  # one more read drains what it left
                        continue
                if idle >= keepalive:
                    idle = 0.0
                    yield None
        finally:
            if watch is not None:
                plugin.reader.unwatch(watch)


    async def _replay(self, offset: int) -> AsyncIterator[Any]:
        """A finished session's chunks from the store, once its owner has
        written them all (it writes within its flush interval)."""
        store = self.plugin.runtime.store
        deadline = trio.current_time() + 5
        while True:
            stored = await store.get(self.id)
            if stored is not None and stored.finished and stored.chunks >= int(self.info.get("chunks") or 0):
                break
            if trio.current_time() > deadline:
                yield APIError(f"The store does not hold all of session '{self.id}' yet; try again.", status=503, type="server_error", code="transcript_incomplete")
                return
            await trio.sleep(0.1)
        while offset < stored.chunks:
            batch = await store.chunks(self.id, offset, PAGE)
            if not batch:
                break
            yield offset, batch
            offset += len(batch)
        yield stored


class Watch:
    """One local follower's interest in a stream: woken when it grows."""

    def __init__(self, key: str, cursor: bytes) -> None:
        self.key = key
        self.cursor = cursor
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class Reader:
    """One `XREAD BLOCK` over every stream a local follower waits on, on a
    connection of its own: a follower costs Redis nothing while it waits, and
    one read wakes every follower of a stream that grew. A stream that starts
    being watched joins at the next read (at most `block_ms` later); its
    follower read everything up to then itself."""

    def __init__(self, block_ms: int = 200) -> None:
        self.block_ms = block_ms
        self._watches: dict[str, set[Watch]] = {}
        #: The last entry id seen per watched stream.
        self._seen: dict[str, bytes] = {}
        self._changed = trio.Event()
        self.reads = 0

    def watch(self, key: str, cursor: bytes) -> Watch:
        watch = Watch(key, cursor)
        if key not in self._watches:
            self._watches[key] = set()
            self._seen[key] = b"0-0" if cursor == b"-" else cursor
        self._watches[key].add(watch)
        self._changed.set()
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.key)
        if watches is None:
            return
        watches.discard(watch)
        if not watches:
            del self._watches[watch.key]
            self._seen.pop(watch.key, None)

    @property
    def watched(self) -> int:
        return len(self._watches)

    async def run(self, client: Any, on_error: Any) -> None:
        backoff = 0.2
        while True:
            if not self._watches:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            try:
                async with client.connection() as conn:
                    backoff = 0.2
                    while self._watches:
                        keys = list(self._watches)
                        ids = [self._seen[k] for k in keys]
                        with trio.fail_after(self.block_ms / 1000 + client.timeout):
                            reply = await conn.execute("XREAD", "COUNT", 32, "BLOCK", self.block_ms, "STREAMS", *keys, *ids)
                        self.reads += 1
                        for stream_key, entries in reply or ():
                            name = stream_key.decode()
                            if name in self._seen and entries:
                                self._seen[name] = entries[-1][0]
                            for watch in self._watches.get(name, ()):
                                watch.wake()
            except Exception as exc:
                on_error("reader", exc)
                # Followers poll once meanwhile: wake them all.
                for watches in list(self._watches.values()):
                    for watch in watches:
                        watch.wake()
                await trio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
