"""The live feed: what every console viewer sees of the live sessions.

One `Hub` per server, running only while a viewer is connected. Every `tick`
it looks at the live sessions once, for all viewers together: the chunks each
session buffered since the last look (so a tick costs what arrived, not what
every session holds), their characters (tokens are estimated from them, as
the runtime does), tokens per second since the first token, the time to the
first token. It sends each viewer the rows that changed and the sessions that
ended, filtered by what the viewer may see. Nothing here touches a stream: no
listener per chunk, no lock; a stream never waits for a viewer.

A viewer's queue holds a few ticks; one that falls further behind is sent a
whole snapshot when it catches up, instead of everything it missed.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import attrs
import trio

from streamvisor.hooks import Principal, Session

#: Ticks a viewer may fall behind before it gets a snapshot instead.
VIEWER_QUEUE = 8


@attrs.define(eq=False)
class _Stats:
    seen: int = 0
    chars: int = 0


@attrs.define(eq=False)
class Viewer:
    principal: Principal
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel
    #: Missed an update: its next message is a snapshot.
    stale: bool = True


def visible(principal: Principal, identity: str, team: str | None) -> bool:
    return principal.sees(identity, team)


class Hub:
    def __init__(self, runtime: Any, tick: float) -> None:
        self.runtime = runtime
        self.tick = tick
        self.viewers: set[Viewer] = set()
        self._stats: dict[str, _Stats] = {}
        self._rows: dict[str, dict[str, Any]] = {}
        self._wake = trio.Event()

    # -- viewers ------------------------------------------------------------------------

    def join(self, principal: Principal) -> Viewer:
        send, receive = trio.open_memory_channel[dict[str, Any]](VIEWER_QUEUE)
        viewer = Viewer(principal, send, receive)
        self.viewers.add(viewer)
        self._wake.set()
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        viewer.send.close()

    def snapshot(self, principal: Principal) -> dict[str, Any]:
        rows = [row for row in self._rows.values() if visible(principal, row["identity"], row["team"])]
        return {"type": "snapshot", "now": time.time(), "sessions": rows}

    # -- the service ----------------------------------------------------------------------

    async def run(self) -> None:
        """The console's `live` service: tick while anyone watches."""
        while True:
            if not self.viewers:
                self._stats.clear()
                self._rows.clear()
                self._wake = trio.Event()
                await self._wake.wait()
            self.update()
            await trio.sleep(self.tick)

    def update(self) -> None:
        now, mono = time.time(), time.perf_counter()
        live = self.runtime.sessions.live()
        rows: dict[str, dict[str, Any]] = {}
        changed: list[dict[str, Any]] = []
        for session in live:
            row = self._row(session, mono)
            rows[session.id] = row
            old = self._rows.get(session.id)
            if old is None or old["tokens"] != row["tokens"] or old["state"] != row["state"] or old["ttft_ms"] != row["ttft_ms"]:
                changed.append(row)
        ended = [self._ended(session_id, old) for session_id, old in self._rows.items() if session_id not in rows]
        for session_id in [s for s in self._stats if s not in rows]:
            del self._stats[session_id]
        self._rows = rows
        if not changed and not ended:
            return
        for viewer in list(self.viewers):
            self._send(viewer, now, changed, ended)

    def _send(self, viewer: Viewer, now: float, changed: Iterable[dict[str, Any]], ended: Iterable[dict[str, Any]]) -> None:
        principal = viewer.principal
        if viewer.stale:
            message = self.snapshot(principal)
            message["ended"] = [row for row in ended if visible(principal, row["identity"], row["team"])]
        else:
            message = {
                "type": "update",
                "now": now,
                "upsert": [row for row in changed if visible(principal, row["identity"], row["team"])],
                "ended": [row for row in ended if visible(principal, row["identity"], row["team"])],
            }
            if not message["upsert"] and not message["ended"]:
                return
        try:
            viewer.send.send_nowait(message)
            viewer.stale = False
        except trio.WouldBlock:
            viewer.stale = True
        except trio.ClosedResourceError:
            self.viewers.discard(viewer)

    def _row(self, session: Session, mono: float) -> dict[str, Any]:
        stats = self._stats.get(session.id)
        if stats is None:
            stats = self._stats[session.id] = _Stats()
        chunks = session.chunks
        end = len(chunks)
        if stats.seen < end:
            for delta in chunks[stats.seen : end]:
                stats.chars += len(delta.content or "") + len(delta.reasoning or "")
            stats.seen = end
        tokens = (stats.chars + 3) // 4
        first = session.first_token_mono
        elapsed = mono - first if first is not None else 0.0
        return {
            "id": session.id,
            "model": session.request.model,
            "identity": session.identity,
            "team": session.team,
            "state": session.state,
            "background": session.background,
            "created_at": round(session.created_at, 3),
            "tokens": tokens,
            "tps": round(tokens / elapsed, 1) if elapsed > 0.05 else None,
            "ttft_ms": None if first is None else round((first - session.created_mono) * 1000, 1),
        }

    def _ended(self, session_id: str, last: dict[str, Any]) -> dict[str, Any]:
        row = dict(last)
        session = self.runtime.sessions.find(session_id)
        if session is not None:
            row["state"] = session.state
            usage = session.usage
            if usage is not None:
                row["tokens"] = usage.completion_tokens
                row["cost_usd"] = usage.cost_usd
            row["duration_ms"] = session.timings().get("duration_ms")
        return row
