"""One fix to hypercorn's trio server, applied by `serve`.

hypercorn closes a keep-alive connection that is idle when the server shuts
down (or idle for `keep_alive_timeout`) from a task it starts each time the
connection becomes idle (`TCPServer.protocol_send(Updated(idle=True))`). With
quart-trio that call runs inside the app's request task, which quart-trio is
cancelling as the response ends: starting the task raises `Cancelled`, so no
idle connection was ever closed. A SIGTERM'd server then waited its whole
`shutdown_grace_seconds` for every client that kept a connection open (a load
balancer always does). Measured with hypercorn 0.18: 5.04 s to stop with one
idle connection and a 5 s grace, 0.03 s without one.

Starting that task for real (shielding the call) fixed shutdown, but put a task
start and a cancellation on every request of a keep-alive connection: about
0.3 ms of CPU per request at concurrency 32 in a paired run. So instead, the
patch keeps a weak set of the connections that are idle (a set operation per
request, nothing else), and `serve` closes those when it stops, again and
again until hypercorn is done, for a connection that becomes idle meanwhile.
`keep_alive_timeout` stays as it was: not enforced.

It patches a private method: `apply()` checks that the names it needs exist
and leaves hypercorn alone otherwise.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import trio

log = logging.getLogger("streamvisor.http")

#: The connections whose last request is answered and that wait for another,
#: per trio run (a process may run several servers, each in its own thread).
_idle: "weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]]" = weakref.WeakKeyDictionary()
_applied = False


def _idle_here() -> "weakref.WeakSet[Any]":
    root = trio.lowlevel.current_root_task()
    found = _idle.get(root)
    if found is None:
        found = _idle[root] = weakref.WeakSet()
    return found


def apply() -> bool:
    """Patch hypercorn's trio `TCPServer` once; whether it is patched."""
    global _applied
    if _applied:
        return True
    try:
        from hypercorn.events import Updated
        from hypercorn.trio.tcp_server import TCPServer
    except ImportError:  # another hypercorn layout: nothing to fix here
        return False
    original = getattr(TCPServer, "protocol_send", None)
    if original is None or not hasattr(TCPServer, "_initiate_server_close"):
        log.warning("hypercorn's TCPServer is not the one streamvisor knows: idle connections may hold a shutdown for its grace period")
        return False

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, Updated):
            if event.idle:
                # hypercorn's own handling would start a task from a cancelled
                # one, and fail: remember the connection instead.
                _idle_here().add(self)
                return
            _idle_here().discard(self)
        await original(self, event)

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    _applied = True
    return True


async def close_idle_connections(every: float = 0.1) -> None:
    """Close the idle connections now, and every `every` seconds until
    cancelled (run it from the moment the server starts stopping)."""
    idle = _idle_here()
    while True:
        for server in list(idle):
            idle.discard(server)
            with trio.CancelScope(shield=True):
                try:
                    await server._initiate_server_close()
                except Exception:  # closed by its client meanwhile
                    pass
        await trio.sleep(every)
