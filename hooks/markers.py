"""The two pluggy markers of the contract, under the project name `streamvisor`."""

import pluggy

PROJECT = "streamvisor"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def listens_to(*types: str):
    """Limit an `on_event` implementation to some event types.

    Events of other types are never built or queued for it, so a listener that
    wants only terminal events costs nothing per chunk::

        @hookimpl
        @listens_to("completed", "failed", "stopped", "disconnected")
        def on_event(event): ...
    """

    def mark(function):
        function.streamvisor_event_types = frozenset(types)
        return function

    return mark
