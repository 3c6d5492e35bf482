"""Every hook a plugin can implement: contract version 1.

Bodies are docstrings only; `docs/hooks.md` repeats each signature and a test keeps
the two in step. An implementation may be a plain function or a coroutine
function: the runtime awaits whatever is awaitable. pluggy passes an
implementation only the arguments it names, so every hook offers `runtime` and an
implementation that does not need it leaves it out; a hook can gain arguments
later without breaking a plugin.

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

    :param runtime: the running `Runtime`; its public API is in docs/hooks.md.
    """


@hookspec
def shutdown(runtime):
    """Called once when the server stops: after live sessions were stopped and
    their terminal events delivered, before providers are closed and services
    cancelled. The whole shutdown shares one grace period.
    """


# -- registration --------------------------------------------------------------


@hookspec
def register_event_types(register, runtime):
    """Declare the event types this plugin emits.

    :param register: call ``register(name, description="")`` once per type;
        the name is unique across core and plugins. Sessions emit declared types
        with ``session.emit(name, **data)``; listeners may `listens_to` them.
    """


@hookspec
def register_providers(register, runtime):
    """Register model providers.

    :param register: call ``register(provider)`` once per provider; a provider has a
        ``name``, an ``async list_models()`` returning `ModelInfo`s and a
        ``stream(request)`` async generator of `Delta`s.
    """


@hookspec
def register_middleware(register, runtime):
    """Wrap the provider call (retry, cache, fallback, guardrails).

    :param register: call ``register(middleware)`` where ``middleware(request,
        call_next, session)`` is an async generator function (or a plain function
        that returns an async iterator, such as ``call_next(request)`` itself). It
        may change the request, call ``call_next(request)`` zero or more times, and
        yields the deltas the client should see. ``session`` is the `Session`:
        set response headers and emit events through it. The middleware of the
        first plugin in plugins.toml is outermost.
    """


@hookspec
def register_chunk_transformers(register, runtime):
    """Transform each chunk of a session before it is buffered and sent.

    :param register: call ``register(factory)``; ``factory(session)`` is called
        when a session starts and returns ``transform(delta)`` for that session
        (or None to leave the session alone). ``transform`` returns the delta to
        keep (the same one or an ``attrs.evolve`` copy) or None to drop it; it may
        keep that session's state, which ends with the session.
    """


@hookspec
def register_routes(register, runtime):
    """Add HTTP routes.

    :param register: call ``register(path, view, methods=("GET",), openapi=None,
        max_body_bytes=None)``; ``view`` is an async quart view function,
        ``openapi`` an optional OpenAPI operation object (or one per method) for
        ``GET /openapi.json``, ``max_body_bytes`` the route's own limit on a
        request body (1.5; `body_chunks()` reads one as a stream). Raise
        `APIError` for an error response in the OpenAI envelope.
    """


@hookspec
def register_services(register, runtime):
    """Add long-lived service actors, supervised one_for_one by the runtime.

    :param register: call ``register(name, run, restart="permanent")``; ``run`` is an
        ``async def run()`` taking no arguments. ``restart`` is "permanent",
        "transient" or "temporary".
    """


@hookspec
def register_health_checks(register, runtime):
    """Add readiness checks (run by the health plugin's /health/ready).

    :param register: call ``register(name, check)`` where ``check`` is an ``async
        def check()`` returning `Health(ok, detail)` or a bool.
    """


@hookspec
def register_store(register, runtime):
    """Offer the session store: where sessions, transcripts and usage outlive
    the process (contract 1.1).

    :param register: call ``register(store)`` with an object that has the
        methods of `SessionStore` (docs/hooks.md). A runtime has at most one
        store, `runtime.store`; a second is a configuration error. The session
        routes ask it for what memory no longer holds, and the usage plugin for
        the ledger.
    """


@hookspec
def register_session_directory(register, runtime):
    """Offer the session directory: where sessions that run on other servers
    are found (contract 1.3).

    :param register: call ``register(directory)`` with an object that has an
        ``async find(session_id)`` returning a `RemoteSession` or None. A runtime
        has at most one, `runtime.directory`. The session routes ask it for a
        session this server's memory does not hold, before the store: reading,
        following, stopping and deleting then work on any server.
    """


@hookspec
def register_authenticators(register, runtime):
    """Authenticate the requests of `/v1` routes (contract 1.2).

    :param register: call ``register(authenticate)`` where ``authenticate(headers,
        path)`` (sync or async) returns a `Principal` for a credential it
        accepts, None for a request it has nothing to say about, or raises an
        `APIError` (a 401) for a credential it refuses. With at least one
        authenticator, a `/v1` request needs a principal from one of them (or
        the admin key); without any, every caller is `ANONYMOUS`.
    """


@hookspec
def register_gates(register, runtime):
    """Admit or refuse a chat request before its session exists (contract 1.2).

    :param register: call ``register(gate)`` where ``gate(request, principal)``
        (sync or async) raises an `APIError` to refuse, or returns None or an
        `Admission` (headers for the response, and a ``release`` called when the
        session is not started after all). ``request`` is the `ChatRequest`
        with its `session_id`, `identity` and `team` already set. Gates run in
        plugins.toml order; the terminal event of the session is where a gate
        settles what it reserved.
    """


@hookspec
def register_pricing(register, runtime):
    """Price sessions (contract 1.2).

    :param register: call ``register(price)`` where ``price(model, usage,
        session)`` returns the cost in US dollars of `usage` on the model the
        client named (`session` is None for an estimate before a session
        exists), or None when it has no price for the model. It is synchronous
        and quick: it runs as a session ends, and its answer becomes
        ``usage.cost_usd`` in the session, its terminal event, its usage chunk
        and the ledger. `runtime.price()` asks the registered functions in order.
    """


@hookspec
def register_status_panels(register, runtime):
    """Publish a status panel: what this plugin shows about itself to operators
    and to other plugins (the admin plugin's /admin/status shows every panel).

    :param register: call ``register(name, panel)`` where ``panel()`` (sync or
        async) returns a JSON-ready dict.
    """


# -- observation ---------------------------------------------------------------


@hookspec
def on_event(event, runtime):
    """Observe a session event: the life cycle (created, started, first_token,
    chunk, completed, failed, stopped, disconnected) and the types plugins declare.

    :param event: a frozen `Event`; a terminal one carries the session's `Outcome`
        (and so its `Usage`).

    Observation cannot change or delay a stream: each listener has its own queue
    and task. Terminal events are never dropped; other events are dropped and
    counted when the listener's queue is full.
    """
