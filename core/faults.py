"""Faults of plugins: what a plugin's code did wrong, counted per plugin and per
place (transformer, middleware, route, status panel, ...), so that admin can
show which plugin misbehaves and a fault never goes unnoticed.

A fault is an exception from a plugin's code that the runtime contained: the
stream or request went on without it. The counts are plain integers on the
event loop's thread; the last error of each kind is kept as one line.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

log = logging.getLogger("streamvisor.faults")

#: The longest error text kept per fault kind.
_DETAIL_LIMIT = 300


class PluginError(Exception):
    """A plugin failed while the runtime started (in a registration hook or in
    `startup`, by raising or by taking too long): the server does not start, and
    says which plugin and which hook."""

    def __init__(self, plugin: str, hook: str, detail: str) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in its {hook} hook: {detail}")


@attrs.define(eq=False)
class FaultCount:
    count: int = 0
    last_error: str | None = None


class PluginFaults:
    """Fault counts by plugin, then by where the fault happened."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, FaultCount]] = {}

    def record(self, plugin: str, where: str, exc: BaseException, *, log_it: bool = True) -> None:
        by_place = self._counts.setdefault(plugin, {})
        count = by_place.get(where)
        if count is None:
            count = by_place[where] = FaultCount()
        count.count += 1
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        count.last_error = text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."
        # The first fault of a kind is logged with its traceback; the next ones
        # on one line each, so that a plugin failing per chunk cannot flood the log.
        if log_it:
            if count.count == 1:
                log.error("plugin %r failed in its %s; the runtime went on without it", plugin, where, exc_info=exc)
            else:
                log.warning("plugin %r failed in its %s again (%d times): %s", plugin, where, count.count, count.last_error)

    def of(self, plugin: str) -> dict[str, dict[str, Any]]:
        return {where: {"count": c.count, "last_error": c.last_error} for where, c in self._counts.get(plugin, {}).items()}

    def total(self, plugin: str) -> int:
        return sum(c.count for c in self._counts.get(plugin, {}).values())
