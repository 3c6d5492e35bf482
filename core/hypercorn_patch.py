"""One fix to hypercorn's trio server, applied by `serve`.

hypercorn closes a keep-alive connection that is idle when the server shuts
down, or idle for `keep_alive_timeout`, from a task it starts when the
connection becomes idle (`TCPServer.protocol_send(Updated(idle=True))`). With
quart-trio that call runs inside the app's request task, which quart-trio is
cancelling as the response ends: starting the task raises `Cancelled`, so no
idle connection was ever closed. A SIGTERM'd server then waited its whole
`shutdown_grace_seconds` for every client that kept a connection open (a load
balancer always does), and idle connections lived until their clients closed
them. Measured with hypercorn 0.18: 5.04 s to stop with one idle connection and
a 5 s grace, 0.03 s without one.

The fix shields that one call, so the idle task starts in the connection's own
task group, where it belongs. It patches a private method: `apply()` checks the
method is the one it knows and leaves hypercorn alone otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

log = logging.getLogger("streamvisor.http")

_applied = False


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
    if original is None or not hasattr(TCPServer, "_idle_timeout"):
        log.warning("hypercorn's TCPServer is not the one streamvisor knows: idle connections may hold a shutdown for its grace period")
        return False

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, Updated) and event.idle:
            with trio.CancelScope(shield=True):
                await original(self, event)
        else:
            await original(self, event)

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    _applied = True
    return True
