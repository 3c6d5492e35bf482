"""A one_for_one supervisor in the manner of OTP, on a trio nursery.

Each child runs in the supervisor's nursery. When a child ends, its restart type
decides what happens: a `permanent` child is always restarted, a `transient` one
only when it crashed, a `temporary` one never. Restarts are counted: more than
`intensity` restarts within `period` seconds means restarting does not help, and
the supervisor escalates by raising `SupervisorEscalation` to its owner.

Cancellation is never caught: cancelling the supervisor's scope ends every child.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from typing import Awaitable, Callable

import attrs
import trio

log = logging.getLogger("streamvisor.supervisor")


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class SupervisorEscalation(Exception):
    """Raised by a supervisor whose children crashed too often."""

    def __init__(self, supervisor: str, child: str, restarts: int, period: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: child {child!r} needed more than {restarts} restarts in {period:g}s"
        )
        self.child = child


@attrs.frozen
class ChildSpec:
    name: str
    run: Callable[[], Awaitable[object]]
    restart: Restart = Restart.PERMANENT


@attrs.define(eq=False)
class ChildStats:
    starts: int = 0
    crashes: int = 0
    last_error: str | None = None
    running: bool = False


class Supervisor:
    def __init__(self, name: str, *, intensity: int = 5, period: float = 10.0) -> None:
        self.name = name
        self.intensity = intensity
        self.period = period
        self.children: dict[str, ChildStats] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._nursery: trio.Nursery | None = None
        self._pending: list[ChildSpec] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled, or until a child crashes too often (then raise)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for spec in self._pending:
                nursery.start_soon(self._supervise, spec, name=f"{self.name}/{spec.name}")
            self._pending.clear()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start_child(self, spec: ChildSpec) -> None:
        """Start `spec` under this supervisor (queued until `run` has started)."""
        if self._nursery is None:
            self._pending.append(spec)
        else:
            self._nursery.start_soon(self._supervise, spec, name=f"{self.name}/{spec.name}")

    async def _supervise(self, spec: ChildSpec) -> None:
        stats = self.children.setdefault(spec.name, ChildStats())
        while True:
            stats.starts += 1
            stats.running = True
            crashed = False
            try:
                await spec.run()
            except Exception as exc:  # trio.Cancelled is a BaseException and passes through
                crashed = True
                stats.crashes += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                log.error("child %s/%s crashed", self.name, spec.name, exc_info=exc)
            finally:
                stats.running = False
            if spec.restart is Restart.TEMPORARY or (spec.restart is Restart.TRANSIENT and not crashed):
                self.children.pop(spec.name, None)
                return
            self._count_restart(spec)
            log.warning("restarting %s/%s (start %d)", self.name, spec.name, stats.starts + 1)
            # A short pause that grows with the recent restarts keeps a crash loop
            # from spinning the CPU before intensity is reached.
            await trio.sleep(min(1.0, 0.01 * math.pow(2, len(self._restarts))))

    def _count_restart(self, spec: ChildSpec) -> None:
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.period:
            self._restarts.popleft()
        if len(self._restarts) > self.intensity:
            raise SupervisorEscalation(self.name, spec.name, self.intensity, self.period)
