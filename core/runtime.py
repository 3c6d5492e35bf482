"""The runtime: owner of the root nursery, the supervisor tree and every session.

`Runtime.open(config)` loads the configured plugins, collects what they register
(providers, middleware, chunk transformers, services, event listeners), starts the
supervisor with the service actors, calls the `startup` hooks and yields the
running runtime. Leaving the context stops live sessions, waits for them within
the shutdown grace period, calls the `shutdown` hooks and cancels everything
left: when `open` returns, no task of the runtime is running.
"""

from __future__ import annotations

import functools
import inspect
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import attrs
import trio
from prometheus_client import CollectorRegistry, Histogram

from streamvisor.config import ConfigError, StreamvisorConfig
from streamvisor.hooks import PluginHost

from .chat import ChatRequest, Delta
from .errors import Overloaded
from .events import EventDispatcher
from .health import HealthCheck
from .providers import ProviderRegistry
from .sessions import Session, SessionActor, SessionRegistry, StreamFn, Transformer, new_id
from .supervisor import ChildSpec, Restart, Supervisor

log = logging.getLogger("streamvisor.runtime")

Middleware = Callable[[ChatRequest, StreamFn], AsyncIterator[Delta]]


@attrs.frozen
class PluginRoute:
    plugin: str
    path: str
    view: Callable[..., Any]
    methods: tuple[str, ...]


def compose(middlewares: list[Middleware], endpoint: StreamFn) -> StreamFn:
    """Wrap `endpoint` so that the first middleware is outermost."""
    stream = endpoint
    for middleware in reversed(middlewares):
        stream = _bind(middleware, stream)
    return stream


def _bind(middleware: Middleware, call_next: StreamFn) -> StreamFn:
    def stream(request: ChatRequest) -> AsyncIterator[Delta]:
        return middleware(request, call_next)

    return stream


class Runtime:
    def __init__(self, config: StreamvisorConfig, host: PluginHost) -> None:
        server = config.server
        self.config = config
        self.plugins = host
        self.providers = ProviderRegistry()
        self.events = EventDispatcher(server.event_queue_size)
        self.sessions = SessionRegistry(server.session_retention_seconds, server.max_retained_sessions)
        self.supervisor = Supervisor("root", intensity=server.restart_intensity, period=server.restart_period_seconds)
        self.middlewares: list[Middleware] = []
        self.transformers: list[Transformer] = []
        self.routes: list[PluginRoute] = []
        self.health_checks: dict[str, HealthCheck] = {}
        #: This runtime's Prometheus registry: plugins add their metrics to it and
        #: the monitor plugin serves it at /metrics. One per runtime, so that two
        #: servers in one process (tests) do not share counters.
        self.metrics = CollectorRegistry(auto_describe=True)
        self.http_requests = Histogram(
            "streamvisor_http_request_duration_seconds",
            "Time to answer an HTTP request (to the first body byte for streams).",
            ["method", "route", "status"],
            registry=self.metrics,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.max_live_sessions = server.max_live_sessions
        self._nursery: trio.Nursery | None = None

    # -- life cycle -----------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, config: StreamvisorConfig, *, plugins: dict[str, Any] | None = None) -> AsyncIterator["Runtime"]:
        """Start a runtime for `config`; `plugins` maps names to plugin objects used
        instead of looking the names up (the table in `config` still decides
        whether they run)."""
        runtime = cls(config, PluginHost.from_config(config, plugins))
        await runtime._register()
        async with trio.open_nursery() as nursery:
            runtime._nursery = nursery
            await nursery.start(runtime.supervisor.run)
            try:
                await runtime.plugins.call("startup", runtime=runtime)
                await runtime.providers.refresh()
                yield runtime
            finally:
                with trio.CancelScope(shield=True):
                    await runtime._stop(config.server.shutdown_grace_seconds)
                nursery.cancel_scope.cancel()

    async def _register(self) -> None:
        host = self.plugins
        await host.call("register_providers", register=self.providers.register)

        def add_middleware(middleware: Middleware) -> None:
            self.middlewares.append(middleware)

        def add_transformer(transform: Transformer) -> None:
            self.transformers.append(transform)

        await host.call("register_middleware", register=add_middleware)
        await host.call("register_chunk_transformers", register=add_transformer)
        await host.call_per_plugin("register_routes", lambda plugin: functools.partial(self._add_route, plugin))
        await host.call_per_plugin("register_services", lambda plugin: functools.partial(self._add_service, plugin))
        await host.call_per_plugin("register_health_checks", lambda plugin: functools.partial(self._add_check, plugin))
        for call in host.implementations("on_event"):
            types = getattr(call.function, "streamvisor_event_types", None)
            try:
                self.events.add_listener(call.plugin_name, _listener(call), types)
            except ValueError as exc:
                raise ConfigError(self.config.source, f"plugins.{call.plugin_name}", "listens_to() with known event types", str(exc)) from None
        self.supervisor.start_child(ChildSpec("session-janitor", self.sessions.janitor))
        for name, run in self.events.services():
            self.supervisor.start_child(ChildSpec(name, run))

    def _add_route(self, plugin: str, path: str, view: Callable[..., Any], methods: tuple[str, ...] | list[str] = ("GET",)) -> None:
        self.routes.append(PluginRoute(plugin, path, view, tuple(methods)))

    def _add_service(self, plugin: str, name: str, run: Callable[[], Any], restart: str = "permanent") -> None:
        self.supervisor.start_child(ChildSpec(f"{plugin}:{name}", run, Restart(restart)))

    def _add_check(self, plugin: str, name: str, check: HealthCheck) -> None:
        self.health_checks[f"{plugin}:{name}"] = check

    async def _stop(self, grace: float) -> None:
        # Each plugin's shutdown hook runs on its own, within the grace period:
        # one that fails or hangs does not keep the others from running.
        for call in self.plugins.implementations("shutdown"):
            with trio.move_on_after(grace) as scope:
                try:
                    await _maybe_await(call(runtime=self))
                except Exception:
                    log.exception("the shutdown hook of plugin %r failed", call.plugin_name)
            if scope.cancelled_caught:
                log.warning("the shutdown hook of plugin %r did not finish within %g s", call.plugin_name, grace)
        live = [s for s in self.sessions.sessions.values() if not s.finished]
        for session in live:
            session.cancel("shutdown")
        with trio.move_on_after(grace):
            for session in live:
                await session.wait_done()
        with trio.move_on_after(grace):
            await self.providers.aclose()

    def task_names(self) -> list[str]:
        """Names of the tasks the runtime's root nursery runs (sessions, supervisor)."""
        if self._nursery is None:
            return []
        return sorted(task.name for task in self._nursery.child_tasks)

    # -- sessions -------------------------------------------------------------

    def open_session(self, request: ChatRequest) -> Session:
        """Resolve the model, register a session and start its actor."""
        route = self.providers.resolve(request.model)
        if self._nursery is None:
            raise RuntimeError("the runtime is not running")
        if self.sessions.live >= self.max_live_sessions:
            raise Overloaded(f"The server is at its limit of {self.max_live_sessions} live sessions; retry shortly.")
        session_id = new_id("sess_")
        request = attrs.evolve(request, session_id=session_id)
        session = Session(
            id=session_id,
            request_id=request.request_id,
            model=request.model,
            provider=route.provider.name,
            request=request,
            identity=request.identity,
            max_chunks=self.config.server.max_session_chunks,
        )
        stream = compose(self.middlewares, self._provider_stream)
        actor = SessionActor(session, stream, request, self.transformers, self.events, self.sessions)
        self.sessions.add(session)
        self.events.emit("created", session)
        self._nursery.start_soon(actor.run, name=f"session:{session_id}")
        return session


    def _provider_stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """The innermost stream: route by the request's model, at call time.

        Middleware sees the model name the client used; one that changes it (a
        fallback) reaches whichever provider serves the new name.
        """
        route = self.providers.resolve(request.model)
        if route.target != request.model:
            request = attrs.evolve(request, model=route.target)
        return route.provider.stream(request)


def _listener(call: Any) -> Callable[[Any], Any]:
    def listen(event: Any) -> Any:
        return call(event=event)

    return listen


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
