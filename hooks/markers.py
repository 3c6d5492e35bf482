"""The markers of the contract, under the project name `streamvisor`, and its version.

`CONTRACT_VERSION` is MAJOR.MINOR. A minor version adds hooks, arguments or
public names; a major version may remove or change them. What a minor version
deprecates warns (`StreamvisorDeprecationWarning`, and a log line naming the
plugin) for at least one minor version before a major version removes it. A
plugin says which version it was written for with a `streamvisor_contract`
attribute (on its class or module); `streamvisor plugins` shows it.
"""

from __future__ import annotations

import logging
import warnings

import pluggy

PROJECT = "streamvisor"
CONTRACT_VERSION = "1.6"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

log = logging.getLogger("streamvisor.plugins")


class StreamvisorDeprecationWarning(DeprecationWarning):
    """A plugin uses a form of the contract that a later major version removes."""


def deprecated(plugin: str, message: str) -> None:
    """Warn that plugin `plugin` uses a deprecated form: a warning for its tests,
    a log line for the operator."""
    warnings.warn(StreamvisorDeprecationWarning(f"plugin {plugin!r}: {message}"), stacklevel=3)
    log.warning("plugin %r uses a deprecated form of the plugin contract: %s", plugin, message)


def listens_to(*types: str, exclude: tuple[str, ...] = ()):
    """Limit an `on_event` implementation to some event types.

    Events of other types are never built or queued for it, so a listener that
    wants only terminal events costs nothing per chunk::

        @hookimpl
        @listens_to("completed", "failed", "stopped", "disconnected")
        def on_event(event): ...

    With `exclude` and no types, it listens to every declared type but those
    (``@listens_to(exclude=("chunk",))``: everything but the per-chunk events,
    including the types other plugins declare). Every type named must be
    declared, or start-up stops with a configuration error.
    """
    if types and exclude:
        raise TypeError("listens_to() takes event types, or exclude=, not both")

    def mark(function):
        if types:
            function.streamvisor_event_types = frozenset(types)
        else:
            function.streamvisor_event_exclude = frozenset(exclude)
        return function

    return mark
