"""Every hook a plugin can implement.

Bodies are docstrings only; `docs/hooks.md` repeats each signature and a test keeps
the two in step. An implementation may be a plain function or a coroutine
function: the runtime awaits whatever is awaitable. pluggy passes an
implementation only the arguments it names, so a hook can gain arguments later
without breaking a plugin.

Hooks that affect the stream itself (middleware, chunk transformers) are
*registration* hooks: they run once at start-up and hand the runtime plain
callables, which the runtime composes in plugins.toml order. Per-chunk work then
costs a function call, not a pluggy dispatch.
"""

from __future__ import annotations

from .markers import hookspec

# -- lifecycle ---------------------------------------------------------------


@hookspec
def startup(runtime):
    """Called once when the runtime has started, before the server accepts requests.

    :param runtime: the `streamvisor.core.runtime.Runtime`; keep it to reach the
        session registry, the event dispatcher or the nursery-owning supervisor.
    """


@hookspec
def shutdown(runtime):
    """Called once when the server stops, before sessions and services are cancelled.

    Runs under a bounded grace period: work that outlives it is cancelled.
    """


# -- registration --------------------------------------------------------------


@hookspec
def register_providers(register):
    """Register model providers.

    :param register: call ``register(provider)`` once per provider; a provider has a
        ``name``, an ``async list_models()`` returning `ModelInfo`s and a
        ``stream(request)`` async generator of `Delta`s (see `streamvisor.core.providers`).
    """


@hookspec
def register_routes(register):
    """Add HTTP routes.

    :param register: call ``register(path, view, methods=("GET",))``; ``view`` is an
        async quart view function. Raise `streamvisor.core.errors.APIError` for an
        error response in the OpenAI envelope.
    """


@hookspec
def register_services(register):
    """Add long-lived service actors, supervised one_for_one by the runtime.

    :param register: call ``register(name, run, restart="permanent")``; ``run`` is an
        ``async def run()`` taking no arguments. ``restart`` is "permanent" (always
        restarted, even when it returns), "transient" (restarted only when it raised)
        or "temporary" (never restarted). Restarts are logged and counted across all
        of the root supervisor's children: more than ``[server] restart_intensity``
        within ``restart_period_seconds`` stop the server.
    """


@hookspec
def register_middleware(register):
    """Wrap the provider call (retry, cache, fallback, guardrails).

    :param register: call ``register(middleware)`` where ``middleware(request,
        call_next)`` is an async generator function (or a plain function that
        returns an async iterator, such as ``call_next(request)`` itself): it may
        change the request, call ``call_next(request)`` (an async iterator of
        `Delta`) zero or more times, and yield the deltas the client should see.
        The middleware of the first plugin in plugins.toml is outermost.
    """


@hookspec
def register_chunk_transformers(register):
    """Transform each chunk before it is buffered and sent.

    :param register: call ``register(transform)`` where ``transform(delta, session)``
        returns the delta to keep (the same one, or a changed copy made with
        ``attrs.evolve``) or ``None`` to drop it. Transformers run in plugins.toml
        order, synchronously, on the hot path: keep them quick.
    """


@hookspec
def register_health_checks(register):
    """Add readiness checks (shown by the health plugin's /health/ready).

    :param register: call ``register(name, check)`` where ``check`` is an ``async
        def check()`` returning `streamvisor.core.health.Health(ok, detail)` or a
        bool. A check that raises or takes longer than its timeout counts as not
        ready.
    """


# -- observation ---------------------------------------------------------------


@hookspec
def on_event(event):
    """Observe a session event (created, started, first_token, chunk, completed,
    failed, stopped, disconnected).

    :param event: a frozen `streamvisor.core.events.Event`.

    Observation cannot change or delay a stream: each listener has its own bounded
    queue and task; an event that finds the queue full is dropped and counted, and
    an exception is logged and counted against the plugin. Async listeners are
    awaited; sync listeners must not block.
    """
