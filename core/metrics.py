"""Prometheus helpers for the hot path.

`prometheus_client`'s `metric.labels(...)` checks the label values and takes a
lock on every call, a couple of microseconds: per request and per metric that adds
up. `Labelled(metric)` remembers the child of each label combination, so that
`Labelled(metric)(a, b).inc()` costs a dict lookup after the first time. The
memory is bounded: past `max_children` combinations the cache starts over (the
metric itself keeps every child, as Prometheus does).
"""

from __future__ import annotations

from typing import Any


class Labelled:
    __slots__ = ("metric", "max_children", "_children")

    def __init__(self, metric: Any, max_children: int = 1024) -> None:
        self.metric = metric
        self.max_children = max_children
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(self._children) >= self.max_children:
                self._children.clear()
            child = self._children[values] = self.metric.labels(*values)
        return child
