"""Micro benchmarks: streamvisor's core pieces timed in-process, without HTTP.

Owns: the cost of one `EventDispatcher.dispatch` (1 and 100 listeners) and of
one `emit` (building the event too); the cost of relaying one chunk, and of one
whole 50-chunk session, through a real `Runtime` with an in-process provider,
without plugins and with the non-provider plugins of the default stack
(plugins.toml); encoding one SSE chunk; and `SessionRegistry.reap` of 100,000
finished sessions.

Each number is the median of several repeats, per operation. Run alone with
`python -m bench.micro` (prints JSON).
"""

from __future__ import annotations

import gc
import inspect
import json
import statistics
import sys
import time
from typing import Any, AsyncIterator, Callable

import trio

from streamvisor.core.chat import ChatRequest, Delta, Usage
from streamvisor.core.events import Event, EventDispatcher
from streamvisor.core.sessions import Session, SessionRegistry, new_id
from streamvisor.core.sse import ChunkEncoder
from streamvisor.hooks import hookimpl

REQUEST = ChatRequest.from_openai({"model": "bench", "messages": [{"role": "user", "content": "Count from one to fifty."}], "stream": True})


def _session(max_chunks: int = 100_000) -> Session:
    return Session(id=new_id("sess_"), request_id="bench", model="bench", provider="bench", request=REQUEST, max_chunks=max_chunks)


# -- events --------------------------------------------------------------------------


def _drain(dispatcher: EventDispatcher) -> None:
    # What the listeners' tasks would do, without running them.
    for listener in dispatcher._listeners:
        listener.queue.clear()
        listener.droppable = 0


async def dispatch_cost(listeners: int, batch: int = 1000, repeats: int = 30) -> float:
    """Seconds per `dispatch` of one event to `listeners` listeners with room in
    their queues (the normal case: the queues are drained between batches)."""
    dispatcher = EventDispatcher(queue_size=batch + 24)
    for i in range(listeners):
        dispatcher.add_listener(f"listener{i}", lambda event: None)
    event = Event("chunk", "sess_x", "req_x", "bench", "bench", time.time(), {"index": 0})
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            dispatcher.dispatch(event)
        samples.append((time.perf_counter() - t0) / batch)
        _drain(dispatcher)
    return statistics.median(samples)


async def emit_cost(listeners: int, batch: int = 1000, repeats: int = 30) -> float:
    """Seconds per `emit` (build the Event, then dispatch it); 0 listeners is the
    early return every chunk takes when nobody listens."""
    dispatcher = EventDispatcher(queue_size=batch + 24)
    for i in range(listeners):
        dispatcher.add_listener(f"listener{i}", lambda event: None)
    session = _session()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(batch):
            dispatcher.emit("chunk", session, index=i)
        samples.append((time.perf_counter() - t0) / batch)
        _drain(dispatcher)
    return statistics.median(samples)


# -- the session actor, inside a real runtime -------------------------------------------


class ReadyProvider:
    """A provider whose chunks are all ready: no I/O, a checkpoint every
    `batch` chunks (as if they came from the network in reads of that size)."""

    name = "bench"

    def __init__(self, chunks: int, batch: int = 50) -> None:
        self.deltas = [Delta(content=f" w{i}", usage=Usage(12, i + 1)) for i in range(chunks - 1)]
        self.deltas.append(Delta(content=" end", finish_reason="stop", usage=Usage(12, chunks)))
        self.batch = batch

    async def list_models(self) -> list[Any]:
        from streamvisor.core.providers import ModelInfo

        return [ModelInfo("bench", owned_by="bench")]

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        for i, delta in enumerate(self.deltas):
            if i and i % self.batch == 0:
                await trio.sleep(0)
            yield delta


class ReadyProviderPlugin:
    def __init__(self, provider: ReadyProvider) -> None:
        self.provider = provider

    @hookimpl
    def register_providers(self, register: Callable[[Any], None]) -> None:
        register(self.provider)


def stack_config(plugins: list[tuple[str, dict[str, Any]]]) -> Any:
    """A runtime config: the repository's [server] settings (log level warning),
    the in-process provider, then `plugins` in order."""
    from streamvisor.config import StreamvisorConfig

    from .servers import repo_server_settings

    tables: dict[str, Any] = {"bench": {}}
    tables.update(dict(plugins))
    return StreamvisorConfig.from_dict({"server": {**repo_server_settings(), "log_level": "warning"}, "plugins": tables}, source="bench: micro")


async def runtime_cost(plugins: list[tuple[str, dict[str, Any]]], chunks: int, sessions: int, repeats: int = 5) -> float:
    """Seconds per session of `chunks` chunks, run one after another through a
    real `Runtime` (its middlewares, transformers, listeners and services), from
    `open_session` until the session is done; no HTTP, no subscriber."""
    from streamvisor.core.runtime import Runtime

    provider = ReadyProvider(chunks)
    samples = []
    async with Runtime.open(stack_config(plugins), plugins={"bench": ReadyProviderPlugin(provider)}) as runtime:
        for _ in range(repeats):
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(sessions):
                session = runtime.open_session(REQUEST)
                await session.wait_done()
                if session.state != "completed":
                    raise RuntimeError(f"a micro-benchmark session ended {session.state}: {session.error}")
            samples.append((time.perf_counter() - t0) / sessions)
            await trio.sleep(0.05)  # let listeners catch up between repeats
    return statistics.median(samples)


def encode_cost(batch: int = 20_000, repeats: int = 7) -> float:
    """Seconds per SSE chunk encoded by `ChunkEncoder.chunk`."""
    encoder = ChunkEncoder("chatcmpl-bench", "bench", 1700000000)
    deltas = [Delta(content=f" word{i}") for i in range(batch)]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, delta in enumerate(deltas):
            encoder.chunk(i, delta)
        samples.append((time.perf_counter() - t0) / batch)
    return statistics.median(samples)


async def reap_cost(count: int = 100_000) -> dict[str, float]:
    """Seconds for `SessionRegistry.reap` to remove `count` finished sessions whose
    retention has passed (one call), and what creating and retiring them took."""
    # Keep all of them until reap (a registry may also cap how many it retains).
    capped = "max_retained" in inspect.signature(SessionRegistry).parameters
    registry = SessionRegistry(retention=1.0, **({"max_retained": count} if capped else {}))
    t0 = time.perf_counter()
    for _ in range(count):
        session = _session()
        registry.add(session)
        session.finish("completed")
        registry.retire(session)
    setup = time.perf_counter() - t0
    del session
    gc.collect()
    t0 = time.perf_counter()
    removed = registry.reap(time.monotonic() + 2.0)
    elapsed = time.perf_counter() - t0
    assert removed == count and not len(registry), f"reap removed {removed} of {count}; {len(registry)} left"
    return {"seconds": elapsed, "setup_seconds": setup}


# -- all of it -------------------------------------------------------------------------


async def _run(progress: Callable[[str], None]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    def row(name: str, seconds: float, unit: str = "ns", note: str = "") -> None:
        value = seconds * 1e9 if unit == "ns" else seconds * 1e6 if unit == "us" else seconds * 1e3
        rows.append({"name": name, "value": f"{value:.1f} {unit}", unit: round(value, 2), "note": note})

    progress("micro: event dispatch")
    row("dispatch, 1 listener", await dispatch_cost(1))
    row("dispatch, 100 listeners", await dispatch_cost(100))
    row("emit, 0 listeners", await emit_cost(0), note="the early return when nobody listens")
    row("emit, 1 listener", await emit_cost(1), note="builds the Event, then dispatch")
    progress("micro: relay")
    from .servers import default_stack

    stack = default_stack()
    names = ", ".join(name for name, _ in stack) or "none"
    bare = "the openai provider replaced by an in-process one with every chunk ready"
    relay_chunks = 10_000
    row("relay one chunk, no plugins", await runtime_cost([], relay_chunks, 1) / relay_chunks, note=f"Runtime + SessionActor, 0 transformers; {bare}")
    row("relay one chunk, default stack", await runtime_cost(stack, relay_chunks, 1) / relay_chunks, note=f"plugins: {names}")
    row("one 50-chunk session, no plugins", await runtime_cost([], 50, 500), unit="us", note="open_session to done: created, relayed, concluded, retired")
    row("one 50-chunk session, default stack", await runtime_cost(stack, 50, 500), unit="us", note=f"plugins: {names}")
    row("encode one SSE chunk", encode_cost(), note="ChunkEncoder.chunk")
    progress("micro: reap")
    reap = await reap_cost()
    row("reap 100,000 finished sessions", reap["seconds"], unit="ms", note=f"one reap() call ({reap['seconds'] / 100_000 * 1e9:.0f} ns per session)")
    return {"rows": rows, "default_stack_plugins": [name for name, _ in stack]}


def run(progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    return trio.run(_run, progress)


if __name__ == "__main__":
    json.dump(run(lambda m: print(m, file=sys.stderr)), sys.stdout, indent=2)
    print()
