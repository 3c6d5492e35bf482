"""The runtime: owner of the root nursery, the supervisor tree and every session.

`Runtime.open(config)` loads the configured plugins, collects what they register
(event types, providers, middleware, chunk transformers, routes, services, health
checks, status panels, event listeners), starts the supervisor with the service
actors, calls the `startup` hooks and yields the running runtime. Leaving the
context stops live sessions, delivers their terminal events, calls the
`shutdown` hooks and closes the providers, all within one grace period, then
cancels everything left: when `open` returns, no task of the runtime is running.

What plugins may use of a `Runtime` is its public API (documented in
docs/hooks.md): `config`, `instance`, `instance_id`, `sessions`, `providers`, `events`, `metrics`, `store`, `directory`,
`health_checks`, `status_panels()`, `plugin_status()`, `open_session()`, `start_chat()`, `find_session()`, `follow_session()`, `emit()`, `authenticate()`. Names
with a leading underscore are the runtime's own.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import math
import os
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping

import attrs
import trio
from prometheus_client import CollectorRegistry, Histogram

from streamvisor.config import ConfigError, StreamvisorConfig
from streamvisor.hooks.manager import PluginHost
from streamvisor.hooks.markers import deprecated

from .auth import ADMIN, ANONYMOUS, Admission, Principal
from .chat import ChatRequest, Delta, Usage
from .directory import RemoteSession, SessionDirectory
from .errors import APIError, InternalError, Overloaded
from .events import EventDispatcher
from .faults import PluginError, PluginFaults
from .health import Health, HealthCheck
from .openapi import plugin_operations
from .providers import ProviderRegistry, Route
from .store import STORE_METHODS, SessionStore, StoredSession
from .sessions import BufferMeter, Session, SessionActor, SessionRegistry, StreamFn, TransformerFactory, new_id, unwrap
from .supervisor import ChildSpec, Restart, Supervisor, SupervisorEscalation
from .web import admin_key, bearer_token

log = logging.getLogger("streamvisor.runtime")

Middleware = Callable[[ChatRequest, StreamFn, Session], AsyncIterator[Delta]]
StatusPanel = Callable[[], Any]
Authenticator = Callable[[Mapping[str, str], str], Any]
Gate = Callable[[ChatRequest, Principal], Any]
Pricer = Callable[[str, Usage, "Session | None"], "float | None"]

#: The bound on one status panel when `status_panels()` gathers them.
PANEL_TIMEOUT_SECONDS = 2.0


@attrs.frozen
class PluginRoute:
    plugin: str
    path: str
    view: Callable[..., Any]
    methods: tuple[str, ...]
    #: The OpenAPI operation of each method the plugin described (upper-case
    #: method names); GET /openapi.json gives the others a generic one.
    openapi: Mapping[str, dict[str, Any]] = attrs.field(factory=dict)
    #: The route's own limit on a request body (contract 1.5), or None for
    #: `[server] max_body_bytes`.
    max_body_bytes: int | None = None


def compose(middlewares: list[tuple[str, Middleware]], endpoint: StreamFn, session: Session, faults: PluginFaults) -> StreamFn:
    """Wrap `endpoint` so that the first middleware is outermost."""
    stream = endpoint
    for plugin, middleware in reversed(middlewares):
        stream = _bind(plugin, middleware, stream, session, faults)
    return stream


def _bind(plugin: str, middleware: Middleware, call_next: StreamFn, session: Session, faults: PluginFaults) -> StreamFn:
    def stream(request: ChatRequest) -> AsyncIterator[Delta]:
        result = middleware(request, call_next, session)
        if not hasattr(result, "__anext__"):
            # Garbage from a middleware: its plugin's fault, not a mystery in core.
            fault = TypeError(f"its middleware returned {type(result).__name__}, not an async iterator of Delta")
            faults.record(plugin, "middleware", fault)
            raise InternalError("The stream failed unexpectedly.")
        return result

    return stream


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments `fn` needs (None when it cannot be told)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and parameter.default is inspect.Parameter.empty:
            count += 1
    return count


class Runtime:
    def __init__(self, config: StreamvisorConfig, host: PluginHost, instance: str | None = None) -> None:
        server = config.server
        self.config = config
        #: This server's name among the servers that share a store or a Redis
        #: (contract 1.3): host and port, with "/wN" for worker N of `serve
        #: --workers`. It is the same again after a restart, so a store can find
        #: the sessions it left live.
        self.instance = instance or f"{os.uname().nodename}:{server.port}"
        #: This process's own id: the name and a random tag, new at every start
        #: (contract 1.3). Stores record it as a session's owner, so the sessions
        #: of a dead process can be told from those of its successor.
        self.instance_id = f"{self.instance}@{secrets.token_hex(4)}"
        self.providers = ProviderRegistry()
        self.events = EventDispatcher(server.event_queue_size, server.listener_timeout_seconds)
        self.sessions = SessionRegistry(server.session_retention_seconds, server.max_retained_sessions)
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
        self.faults = PluginFaults()
        #: Bytes held by every session's buffer together (bounded by max_buffered_bytes).
        self.buffers = BufferMeter()
        self.sessions.meter = self.buffers
        self._host = host
        self._supervisor = Supervisor("root", intensity=server.restart_intensity, period=server.restart_period_seconds)
        #: Each plugin's services run under a supervisor of their own: a plugin
        #: whose services crash too often loses them, not the server.
        self._plugin_supervisors: dict[str, Supervisor] = {}
        self._middlewares: list[tuple[str, Middleware]] = []
        self._transformers: list[tuple[str, TransformerFactory]] = []
        self._routes: list[PluginRoute] = []
        self._health_checks: dict[str, HealthCheck] = {}
        self._panels: dict[str, dict[str, StatusPanel]] = {}
        self._authenticators: list[tuple[str, Authenticator]] = []
        self._gates: list[tuple[str, Gate]] = []
        self._pricers: list[tuple[str, Pricer]] = []
        self._max_live_sessions = server.max_live_sessions
        #: The session store a plugin offered (`register_store`), or None.
        self.store: SessionStore | None = None
        self._store_plugin: str | None = None
        #: Where sessions on other servers are found (`register_session_directory`;
        #: contract 1.3), or None.
        self.directory: SessionDirectory | None = None
        self._directory_plugin: str | None = None
        self._nursery: trio.Nursery | None = None

    # -- life cycle -----------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, config: StreamvisorConfig, *, plugins: dict[str, Any] | None = None, instance: str | None = None) -> AsyncIterator["Runtime"]:
        """Start a runtime for `config`; `plugins` maps names to plugin objects used
        instead of looking the names up (the table in `config` still decides
        whether they run). `instance` names this server (`Runtime.instance`;
        host and port by default)."""
        runtime = cls(config, PluginHost.from_config(config, plugins), instance)
        await runtime._register()
        async with trio.open_nursery() as nursery:
            runtime._nursery = nursery
            await nursery.start(runtime._supervisor.run)
            try:
                await runtime._call_hook("startup")
                await runtime.providers.refresh()
                yield runtime
            finally:
                with trio.CancelScope(shield=True):
                    await runtime._stop(config.server.shutdown_grace_seconds)
                nursery.cancel_scope.cancel()

    async def _call_hook(self, hook: str, make_register: Callable[[str], Callable[..., Any]] | None = None) -> None:
        """Call a start-up hook of every plugin in order. A plugin that raises, or
        takes longer than `[server] startup_timeout_seconds`, stops start-up
        with a `PluginError` naming it and the hook."""
        timeout = self.config.server.startup_timeout_seconds
        for call in self._host.implementations(hook):
            kwargs: dict[str, Any] = {"runtime": self}
            if make_register is not None:
                kwargs["register"] = make_register(call.plugin_name)
            try:
                with trio.fail_after(timeout):
                    await _maybe_await(call(**kwargs))
            except ConfigError:
                raise
            except trio.TooSlowError:
                raise PluginError(call.plugin_name, hook, f"it did not finish within {timeout:g} s (startup_timeout_seconds)") from None
            except Exception as exc:
                inner = unwrap(exc)
                if isinstance(inner, ConfigError):
                    raise inner from None
                raise PluginError(call.plugin_name, hook, f"{type(inner).__name__}: {inner}") from exc

    async def _register(self) -> None:
        host = self._host

        def per_plugin(method: Callable[..., Any]) -> Callable[[str], Callable[..., Any]]:
            return lambda plugin: functools.partial(method, plugin)

        await self._call_hook("register_event_types", per_plugin(self._declare_event_type))
        await self._call_hook("register_providers", lambda plugin: self.providers.register)
        await self._call_hook("register_middleware", per_plugin(self._add_middleware))
        await self._call_hook("register_chunk_transformers", per_plugin(self._add_transformer))
        await self._call_hook("register_routes", per_plugin(self._add_route))
        await self._call_hook("register_services", per_plugin(self._add_service))
        await self._call_hook("register_health_checks", per_plugin(self._add_check))
        await self._call_hook("register_store", per_plugin(self._set_store))
        await self._call_hook("register_session_directory", per_plugin(self._set_directory))
        await self._call_hook("register_authenticators", per_plugin(self._adder(self._authenticators, "authenticator")))
        await self._call_hook("register_gates", per_plugin(self._adder(self._gates, "gate")))
        await self._call_hook("register_pricing", per_plugin(self._adder(self._pricers, "price function")))
        await self._call_hook("register_status_panels", per_plugin(self._add_panel))
        for call in host.implementations("on_event"):
            types = getattr(call.function, "streamvisor_event_types", None)
            exclude = getattr(call.function, "streamvisor_event_exclude", None)
            if exclude is not None:
                unknown = exclude - set(self.events.types)
                if unknown:
                    raise ConfigError(self.config.source, f"plugins.{call.plugin_name}", "listens_to(exclude=...) with declared event types", f"undeclared: {', '.join(sorted(unknown))}")
                types = frozenset(self.events.types) - exclude
            try:
                self.events.add_listener(call.plugin_name, _listener(call, self), types)
            except ValueError as exc:
                raise ConfigError(self.config.source, f"plugins.{call.plugin_name}", "listens_to() with declared event types", str(exc)) from None
        self._supervisor.start_child(ChildSpec("session-janitor", self.sessions.janitor))
        for plugin, name, run in self.events.services():
            self._supervisor.start_child(ChildSpec(name, run))
        for plugin, supervisor in self._plugin_supervisors.items():
            self._supervisor.start_child(ChildSpec(supervisor.name, self._plugin_services(plugin, supervisor), Restart.TEMPORARY))

    def _plugin_services(self, plugin: str, supervisor: Supervisor) -> Callable[[], Any]:
        async def run() -> None:
            try:
                await supervisor.run()
            except Exception as exc:
                inner = unwrap(exc)
                if not isinstance(inner, SupervisorEscalation):
                    raise
                self.faults.record(plugin, "services", inner, log_it=False)
                log.error("gave up on the services of plugin %r (%s); the server goes on without them", plugin, inner)

        return run

    def _declare_event_type(self, plugin: str, name: str, description: str = "") -> None:
        try:
            self.events.declare(plugin, name, description)
        except ValueError as exc:
            raise ConfigError(self.config.source, f"plugins.{plugin}", "event types of its own", str(exc)) from None

    def _add_middleware(self, plugin: str, middleware: Callable[..., Any]) -> None:
        if _required_positional(middleware) == 2:
            deprecated(plugin, "a middleware taking (request, call_next) is the contract 0 form; take (request, call_next, session)")
            legacy = middleware

            def middleware(request: ChatRequest, call_next: StreamFn, session: Session) -> AsyncIterator[Delta]:
                return legacy(request, call_next)

        if not callable(middleware):
            raise TypeError(f"the middleware {middleware!r} is not callable")
        self._middlewares.append((plugin, middleware))

    def _add_transformer(self, plugin: str, factory: Callable[..., Any]) -> None:
        if _required_positional(factory) == 2:
            deprecated(plugin, "a chunk transformer taking (delta, session) is the contract 0 form; register a factory(session) returning transform(delta)")
            legacy = factory

            def factory(session: Session) -> Callable[[Delta], Delta | None]:
                return lambda delta: legacy(delta, session)

        if not callable(factory):
            raise TypeError(f"the chunk transformer factory {factory!r} is not callable")
        self._transformers.append((plugin, factory))

    def _add_route(
        self,
        plugin: str,
        path: str,
        view: Callable[..., Any],
        methods: tuple[str, ...] | list[str] = ("GET",),
        *,
        openapi: Any = None,
        max_body_bytes: int | None = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise TypeError(f"a route's path is a string starting with '/', not {path!r}")
        if not callable(view):
            raise TypeError(f"the view of route {path} is {view!r}, not an async function")
        if max_body_bytes is not None and (isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1):
            raise TypeError(f"the max_body_bytes of route {path} is a number of bytes (1 or more), not {max_body_bytes!r}")
        methods = tuple(methods)
        self._routes.append(PluginRoute(plugin, path, view, methods, plugin_operations(openapi, methods, path), max_body_bytes))

    def _add_service(self, plugin: str, name: str, run: Callable[[], Any], restart: str = "permanent") -> None:
        if not callable(run):
            raise TypeError(f"the service {name!r} is {run!r}, not an async function")
        supervisor = self._plugin_supervisors.get(plugin)
        if supervisor is None:
            server = self.config.server
            supervisor = self._plugin_supervisors[plugin] = Supervisor(
                f"plugin:{plugin}", intensity=server.restart_intensity, period=server.restart_period_seconds
            )
        supervisor.start_child(ChildSpec(name, run, Restart(restart)))

    def _add_check(self, plugin: str, name: str, check: HealthCheck) -> None:
        if not callable(check):
            raise TypeError(f"the health check {name!r} is {check!r}, not an async function")
        self._health_checks[f"{plugin}:{name}"] = check

    @staticmethod
    def _adder(into: list[tuple[str, Any]], what: str) -> Callable[..., None]:
        def add(plugin: str, function: Any) -> None:
            if not callable(function):
                raise TypeError(f"the {what} {function!r} is not callable")
            into.append((plugin, function))

        return add

    def _set_store(self, plugin: str, store: Any) -> None:
        missing = [name for name in STORE_METHODS if not callable(getattr(store, name, None))]
        if missing:
            raise TypeError(f"the store {store!r} lacks the methods {', '.join(missing)}")
        if self._store_plugin is not None:
            raise ConfigError(
                self.config.source, f"plugins.{plugin}", "one session store per server", f"plugin {self._store_plugin!r} offers one already"
            )
        self.store, self._store_plugin = store, plugin

    def _set_directory(self, plugin: str, directory: Any) -> None:
        if not callable(getattr(directory, "find", None)):
            raise TypeError(f"the session directory {directory!r} has no find(session_id) method")
        if self.directory is not None:
            raise ConfigError(
                self.config.source, f"plugins.{plugin}", "one plugin offering a session directory", f"a second one (plugin {self._directory_plugin!r} offers one)"
            )
        self.directory, self._directory_plugin = directory, plugin

    def _add_panel(self, plugin: str, name: str, panel: StatusPanel) -> None:
        if not callable(panel):
            raise TypeError(f"the status panel {name!r} is {panel!r}, not a function")
        panels = self._panels.setdefault(plugin, {})
        if name in panels:
            raise ConfigError(self.config.source, f"plugins.{plugin}", "status panels with distinct names", f"two named {name!r}")
        panels[name] = panel

    async def _stop(self, grace: float) -> None:
        """Stop within one grace period in all: cancel live sessions and wait for
        them, deliver the terminal events, call the `shutdown` hooks, close the
        providers. A step that overruns leaves the later ones less time, never
        more than the period in all."""
        deadline = trio.current_time() + grace
        live = self.sessions.live()
        for session in live:
            session.cancel("shutdown")
        with trio.move_on_at(deadline):
            for session in live:
                await session.wait_done()
        with trio.move_on_at(deadline):
            await self.events.drain()
        for call in self._host.implementations("shutdown"):
            with trio.move_on_at(deadline) as scope:
                try:
                    await _maybe_await(call(runtime=self))
                except Exception as exc:
                    self.faults.record(call.plugin_name, "shutdown hook", exc)
            if scope.cancelled_caught:
                log.warning("the shutdown hook of plugin %r did not finish within the grace period (%g s)", call.plugin_name, grace)
        with trio.move_on_at(deadline):
            await self.providers.aclose()

    # -- who asks, and what it costs (contract 1.2) -----------------------------

    @property
    def authenticates(self) -> bool:
        """Whether a plugin authenticates requests (`/v1` routes need a credential)."""
        return bool(self._authenticators)

    async def authenticate(self, headers: Mapping[str, str], path: str) -> Principal:
        """The principal of a request: `ADMIN` for the admin key, else the first
        authenticator's answer; `ANONYMOUS` when no plugin authenticates. An
        authenticator's `APIError` is the answer; none vouching is a 401."""
        token = bearer_token(headers)
        key = admin_key()
        if token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode()):
            return ADMIN
        if not self._authenticators:
            return ANONYMOUS
        for plugin, authenticate in self._authenticators:
            principal = await self._ask(
                plugin, "authenticator", Principal, "The server could not check the request's credentials.", authenticate, headers, path
            )
            if principal is not None:
                return principal
        raise APIError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'." if token is None else "Incorrect API key provided.",
            status=401,
            type="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def admit(self, request: ChatRequest, principal: Principal) -> list[Admission]:
        """Run every gate on a request about to become a session. When one
        refuses, those that had let it through are released and the refusal
        (with their headers) is raised."""
        admitted: list[Admission] = []
        try:
            for plugin, gate in self._gates:
                result = await self._ask(plugin, "gate", Admission, "The server could not admit the request.", gate, request, principal)
                if result is not None:
                    admitted.append(result)
        except APIError as refusal:
            await self.release(admitted)
            refusal.headers = {**admission_headers(admitted), **refusal.headers}
            raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(admitted)
            raise
        return admitted

    async def _ask(self, plugin: str, what: str, expected: type, failure: str, function: Callable[..., Any], *args: Any) -> Any:
        """A plugin's answer (sync or async) of the `expected` type, or None.
        Its `APIError` is the request's answer; anything else it raises or
        returns is its fault, counted, and a 500 saying `failure`."""
        try:
            result = await _maybe_await(function(*args))
        except APIError:
            raise
        except Exception as exc:
            self.faults.record(plugin, what, exc)
            raise InternalError(failure) from None
        if result is not None and not isinstance(result, expected):
            self.faults.record(plugin, what, TypeError(f"it returned {type(result).__name__}, not {expected.__name__}"))
            raise InternalError(failure)
        return result

    async def release(self, admissions: list[Admission]) -> None:
        """Undo admissions whose session never started."""
        for admission in admissions:
            if admission.release is None:
                continue
            try:
                await _maybe_await(admission.release())
            except Exception:
                log.exception("releasing an admission failed")

    def emit(self, type: str, **data: Any) -> None:
        """Dispatch an event that belongs to no session (contract 1.5): a key
        crossing its budget, a circuit opening. `type` is one this plugin
        declared; its `Event` has empty session fields, and `model`,
        `provider`, `identity`, `team` and `key_id` taken from `data` when it
        has them. Like every non-terminal event, it is dropped (and counted)
        for a listener whose queue is full."""
        self.events.emit_global(type, data)

    def price(self, model: str, usage: Usage, session: Session | None = None) -> float | None:
        """What `usage` on `model` costs in US dollars: the first registered price
        function's answer that is not None; None when none prices it. A price
        function that raises counts as a fault of its plugin and prices nothing."""
        for plugin, price in self._pricers:
            try:
                cost = price(model, usage, session)
                if cost is None:
                    continue
                if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
                    raise TypeError(f"it priced {model!r} at {cost!r}, not a number of US dollars of at least 0")
            except Exception as exc:
                self.faults.record(plugin, "price function", exc)
                continue
            return float(cost)
        return None

    # -- introspection --------------------------------------------------------

    @property
    def routes(self) -> list[PluginRoute]:
        """The routes plugins registered, in registration order."""
        return list(self._routes)

    @property
    def health_checks(self) -> Mapping[str, HealthCheck]:
        """Every registered readiness check, by "PLUGIN:NAME"."""
        return dict(self._health_checks)

    async def check_health(self, timeout: float = 2.0) -> dict[str, tuple[Health, float]]:
        """Run every readiness check at once, each under `timeout`: ``{"PLUGIN:NAME":
        (Health, milliseconds)}``. A check that raises, takes too long or returns
        neither a `Health` nor a bool is not ready, says why, and counts as a
        fault of its plugin."""
        results: dict[str, tuple[Health, float]] = {}

        async def run(name: str, check: HealthCheck) -> None:
            plugin = name.partition(":")[0]
            t0 = time.perf_counter()
            health: Health
            try:
                with trio.move_on_after(timeout) as scope:
                    value = await _maybe_await(check())
                if scope.cancelled_caught:
                    health = Health(False, f"did not answer within {timeout:g} s")
                    self.faults.record(plugin, "health check", TimeoutError(f"check {name!r} took longer than {timeout:g} s"), log_it=False)
                elif isinstance(value, Health):
                    health = value
                elif isinstance(value, bool):
                    health = Health(value)
                else:
                    health = Health(False, f"the check returned {type(value).__name__}, expected Health or a bool")
                    self.faults.record(plugin, "health check", TypeError(health.detail), log_it=False)
            except Exception as exc:
                health = Health(False, f"raised {type(exc).__name__}: {exc}" if str(exc) else f"raised {type(exc).__name__}")
                self.faults.record(plugin, "health check", exc, log_it=False)
            results[name] = (health, round((time.perf_counter() - t0) * 1000, 3))

        checks = dict(self._health_checks)
        async with trio.open_nursery() as nursery:
            for name, check in checks.items():
                nursery.start_soon(run, name, check)
        return {name: results[name] for name in checks}

    async def status_panels(self, timeout: float = PANEL_TIMEOUT_SECONDS) -> dict[str, dict[str, Any]]:
        """Every plugin's status panels, gathered at once: ``{plugin: {name:
        value}}``. A panel that raises or takes longer than `timeout` shows
        ``{"error": ...}`` and counts as a fault of its plugin."""
        results: dict[str, dict[str, Any]] = {plugin: {} for plugin in self._panels}

        async def run(plugin: str, name: str, panel: StatusPanel) -> None:
            value: Any
            try:
                with trio.move_on_after(timeout) as scope:
                    value = await _maybe_await(panel())
                if scope.cancelled_caught:
                    value = {"error": f"no answer within {timeout:g} s"}
                    self.faults.record(plugin, "status panel", TimeoutError(f"panel {name!r} took longer than {timeout:g} s"), log_it=False)
            except Exception as exc:
                self.faults.record(plugin, "status panel", exc)
                value = {"error": f"{type(exc).__name__}: {exc}"}
            if attrs.has(type(value)):
                value = attrs.asdict(value)
            results[plugin][name] = value

        async with trio.open_nursery() as nursery:
            for plugin, panels in self._panels.items():
                for name, panel in panels.items():
                    nursery.start_soon(run, plugin, name, panel)
        return results

    def plugin_status(self) -> list[dict[str, Any]]:
        """Each loaded plugin, in plugins.toml order: where it comes from, the
        contract it was written for, its hooks, its services and listener, and
        the faults counted against it."""
        listeners = {stats.plugin: stats for stats in self.events.stats}
        root = self._supervisor.children
        out = []
        for loaded in self._host:
            children = dict(self._plugin_supervisors[loaded.name].children) if loaded.name in self._plugin_supervisors else {}
            if f"listener:{loaded.name}" in root:
                children["listener"] = root[f"listener:{loaded.name}"]
            services = {
                name: {"starts": stats.starts, "crashes": stats.crashes, "running": stats.running, "last_error": stats.last_error}
                for name, stats in children.items()
            }
            listener = listeners.get(loaded.name)
            faults = self.faults.of(loaded.name)
            errors = {
                "listener_errors": listener.errors if listener else 0,
                "listener_dropped": listener.dropped if listener else 0,
                "service_crashes": sum(s["crashes"] for s in services.values()),
                "faults": self.faults.total(loaded.name),
            }
            out.append(
                {
                    "name": loaded.name,
                    "version": loaded.version,
                    "origin": loaded.origin,
                    "contract": loaded.contract,
                    "hooks": loaded.hooks,
                    "errors": {**errors, "total": sum(errors.values())},
                    "faults": faults,
                    "listener": None if listener is None else attrs.asdict(listener),
                    "services": services,
                }
            )
        return out

    def task_names(self) -> list[str]:
        """Names of the tasks the runtime's root nursery runs (sessions, supervisor)."""
        if self._nursery is None:
            return []
        return sorted(task.name for task in self._nursery.child_tasks)

    # -- sessions -------------------------------------------------------------

    def open_session(self, request: ChatRequest) -> Session:
        """Resolve the model, register a session and start its actor (see
        `check_capacity`). The request's `session_id` is kept when set (a gate
        saw it), else one is made."""
        return self._start(request, self.check_capacity(request))

    async def start_chat(self, request: ChatRequest, principal: Principal | None = None) -> tuple[Session, dict[str, str]]:
        """What `POST /v1/chat/completions` does before it answers, for a plugin
        that offers another API over sessions (contract 1.4): the server's
        capacity, the gates for `principal` (the request's caller by default),
        then the session. Returns the session and the headers the gates asked
        the response to carry. The request should have its `request_id`,
        `identity`, `team` and `key_id` set (`attrs.evolve`); a `session_id` is
        made when it has none. The opener must `release()` the session when it
        is done with its buffer, and cancel it ("disconnected") when its client
        goes, unless it is a background session."""
        from .auth import current_principal

        if principal is None:
            principal = current_principal()
        if not request.session_id:
            request = attrs.evolve(request, session_id=new_id("sess_"))
        if self.gated:
            # Refuse before a gate reserves anything; open_session checks again
            # after the gates, which may have waited.
            self.check_capacity(request)
        admissions = await self.admit(request, principal)
        try:
            session = self.open_session(request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(admissions)
            raise
        return session, admission_headers(admissions)

    async def find_session(self, session_id: str, principal: Principal | None = None) -> "Session | StoredSession | RemoteSession":
        """A session wherever it is (contract 1.4): in memory, on another server
        (`directory`), or in the store, under core's rules: a session the
        caller may not see is a `NotFound` (404) like an unknown id, and a
        deleted or purged one a 410. The caller is `principal` (1.5: a route
        that authenticates its own way, the console's cookie), else the
        request's."""
        from .session_api import find

        return await find(self, session_id, principal)

    async def follow_session(self, found: "Session | StoredSession | RemoteSession", offset: int = 0, keepalive: float | None = None) -> AsyncIterator[Any]:
        """The chunks of a session `find_session` gave, from `offset` on, as
        they come, wherever it runs (contract 1.4): an async iterator of
        `(offset, [Delta, ...])` batches, None after `keepalive` seconds
        (`[server] keepalive_seconds`) without any, and last its end as a
        `StoredSession` (state, finish reason, usage, error), or an `APIError`
        when the rest cannot be had. Raises a 410 `APIError` at once when its
        transcript is not kept."""
        from .session_api import chunk_source

        return await chunk_source(self, found, offset, self.config.server.keepalive_seconds if keepalive is None else keepalive)

    @property
    def gated(self) -> bool:
        """Whether a plugin registered a gate."""
        return bool(self._gates)

    def check_capacity(self, request: ChatRequest) -> Route:
        """Whether a session for `request` may open now: its model resolves, and
        the server has room. Refused with `Overloaded` (503) while the live
        sessions, plus the terminal events a listener has yet to handle, reach
        `[server] max_live_sessions`. Returns the model's route."""
        route = self.providers.resolve(request.model)
        if self._nursery is None:
            raise RuntimeError("the runtime is not running")
        live = self.sessions.live_count
        if live >= self._max_live_sessions:
            raise Overloaded(f"The server is at its limit of {self._max_live_sessions} live sessions; retry shortly.", headers={"Retry-After": "1"})
        if live + self.events.terminal_backlog() >= self._max_live_sessions:
            raise Overloaded(
                "The server is recording finished sessions more slowly than they end; retry shortly.", headers={"Retry-After": "1"}
            )
        if self.buffers.bytes >= self.config.server.max_buffered_bytes:
            raise Overloaded(
                f"The server holds {self.config.server.max_buffered_bytes} bytes of streams, its limit; retry shortly.",
                headers={"Retry-After": "1"},
            )
        if request.background:
            limit = self.config.server.max_background_sessions
            if self.sessions.live_background(request.identity) >= limit:
                raise APIError(
                    f"'{request.identity}' has {limit} background sessions running, the limit ([server] max_background_sessions); "
                    "wait for one to finish or stop one (POST /v1/sessions/{id}/stop).",
                    status=429,
                    type="rate_limit_error",
                    code="too_many_background_sessions",
                    headers={"Retry-After": "1"},
                )
        return route

    def _start(self, request: ChatRequest, route: Route) -> Session:
        assert self._nursery is not None
        session_id = request.session_id or new_id("sess_")
        if not request.session_id:
            request = attrs.evolve(request, session_id=session_id)
        session = Session(
            id=session_id,
            request_id=request.request_id,
            model=request.model,
            provider=route.provider.name,
            request=request,
            identity=request.identity,
            team=request.team,
            key_id=request.key_id,
            background=request.background,
            max_chunks=self.config.server.max_session_chunks,
            events=self.events,
            meter=self.buffers,
        )
        # The innermost stream routes by the request's model at call time:
        # middleware sees the model name the client used; one that changes it
        # (a fallback) reaches whichever provider serves the new name, one that
        # pins `request.provider` (a router) that provider.
        end = self.providers.stream
        stream = compose(self._middlewares, end, session, self.faults) if self._middlewares else end
        actor = SessionActor(
            session, stream, self._transformers, self.events, self.sessions, self.faults, self._host.blame, self.price if self._pricers else None
        )
        self.sessions.add(session)
        self.events.emit("created", session)
        self._nursery.start_soon(actor.run, name=f"session:{session_id}")
        return session

def admission_headers(admissions: list[Admission]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for admission in admissions:
        headers.update(admission.headers)
    return headers


def _listener(call: Any, runtime: Runtime) -> Callable[[Any], Any]:
    def listen(event: Any) -> Any:
        return call(event=event, runtime=runtime)

    return listen


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
