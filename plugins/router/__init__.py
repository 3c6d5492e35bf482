"""The `router` plugin: one model name, several deployments, each request sent
where it is served best, and hedged first tokens.

A routed model (`[plugins.router.models.NAME]`) lists deployments: a provider
and one of its models (an upstream of the openai plugin, the local model, any
plugin's provider), each with a weight, a cost and `max_concurrent`. The plugin
lists the routed names as models of its own provider, `router`, so clients see
them in `/v1/models`; its middleware then sends each call to a deployment by
pinning `ChatRequest.provider` (contract 1.6). It comes before the retry plugin
in plugins.toml: retries and circuit breakers then act per deployment, and a
deployment whose circuit is open (a 503 `circuit_open`) leaves the rotation for
the circuit's cooldown.

A call runs in the session's own task: the chosen deployment, then, when it
fails before its first token, the next one (`router.failover`). With hedging
(`hedge_after_ms`, or `hedge_after = "p90"`), the plugin's `hedges` service
keeps one timer for every hedged request and, when a request's time comes with
no first token, calls the next-best deployment in a task of its own. The first
call to produce a token wins; the other is cancelled at once, which closes its
upstream connection. Only the winner's deltas leave the middleware (a winning
hedge's over a bounded channel). The session's generator never holds a nursery
or a cancel scope across a `yield`, so nothing the plugin does can cancel the
code that reads it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import random
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import attrs
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    ConfigError,
    Delta,
    Event,
    Health,
    InternalError,
    ModelInfo,
    Overloaded,
    RecordStore,
    Session,
    UpstreamError,
    Usage,
    hookimpl,
    json_response,
    listens_to,
    log_context,
    message_text,
    not_negative,
    positive,
    require_admin,
    unwrap,
)

from .state import DeploymentState, Tuning, order, priors

log = logging.getLogger("streamvisor.plugins.router")

__all__ = ["RouterPlugin", "Settings", "ModelRoute", "Deployment"]

STRATEGIES = ("latency", "weighted", "least_busy", "cost")
#: Deltas an attempt may hand over before the session takes them.
CHANNEL = 32
#: Deltas before the first visible one (usage-only, role-only) held per attempt.
HEAD_LIMIT = 64
#: How long the session waits, when it ends, for its attempts to close.
CLOSE_GRACE = 5.0
#: Past this many waiting hedge timers, those of ended requests are dropped.
TIMERS_COMPACT = 10_000
#: The store's amounts of what lost hedges spent, by deployment and month.
LOST_KIND = "router:hedge_lost"

_END = object()


def _fraction(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} is a fraction from 0 to 1")


def _hedge_after(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value and not (value[:1] == "p" and value[1:].replace(".", "", 1).isdigit() and 0 < float(value[1:]) < 100):
        raise ValueError('hedge_after is a percentile of the learned time to first token, such as "p90"')


@attrs.frozen
class Deployment:
    #: The provider's model: its name as clients would use it, or its target.
    model: str
    #: The provider (an openai upstream's `name`, "local", ...); empty: whichever serves `model`.
    provider: str = ""
    #: How it is shown in /admin/router, events and metrics; default "provider/model".
    name: str = ""
    #: The share of traffic for `weighted` (and among near-equals for `latency`);
    #: 0: only when the others are full, failing or slower.
    weight: float = attrs.field(default=1.0, validator=not_negative)
    #: US dollars per million tokens, for `cost`; default: the pricing plugin's
    #: price of half a million prompt and half a million completion tokens.
    cost: float | None = None
    #: Streams it may carry at once; 0: no limit.
    max_concurrent: int = attrs.field(default=0, validator=not_negative)

    @property
    def label(self) -> str:
        return self.name or (f"{self.provider}/{self.model}" if self.provider else self.model)


def _deployments(instance: Any, attribute: attrs.Attribute, value: list[Deployment]) -> None:
    if not value:
        raise ValueError("a routed model needs at least one deployment")
    labels = [d.label for d in value]
    if len(set(labels)) != len(labels):
        raise ValueError(f"deployments need distinct names (give `name`): {labels}")


@attrs.frozen
class ModelRoute:
    deployments: list[Deployment] = attrs.field(validator=_deployments)
    strategy: str = attrs.field(default="latency", validator=attrs.validators.in_(STRATEGIES))
    #: Send the request to the next-best deployment too when no token came in this long; 0: no hedging.
    hedge_after_ms: float = attrs.field(default=0.0, validator=not_negative)
    #: Or a percentile of the first deployment's learned time to first token
    #: ("p90"); `hedge_after_ms` until `hedge_min_samples` were seen.
    hedge_after: str = attrs.field(default="", validator=_hedge_after)
    #: Try the next deployment when one fails before its first token.
    failover: bool = True


@attrs.frozen
class Settings:
    models: dict[str, ModelRoute] = attrs.field(factory=dict)
    #: `latency`: the share of requests sent to another deployment than the best, to notice a recovery.
    explore: float = attrs.field(default=0.05, validator=_fraction)
    #: Weight of a new sample in the moving averages.
    alpha: float = attrs.field(default=0.3, validator=_fraction)
    #: An estimate's pull toward the best deployment's halves in this long without samples.
    half_life_seconds: float = attrs.field(default=300.0, validator=positive)
    #: Deployments within this fraction of the best score share its traffic by weight.
    near_best: float = attrs.field(default=0.2, validator=not_negative)
    #: The score is the time to first token plus the time for this many tokens after it.
    latency_tokens: int = attrs.field(default=64, validator=not_negative)
    #: Failures in a row that take a deployment out of the rotation, and for how long.
    eject_after: int = attrs.field(default=3, validator=positive)
    eject_seconds: float = attrs.field(default=10.0, validator=positive)
    #: At most this share of routed requests is hedged (a budget refilled per request) ...
    hedge_max_share: float = attrs.field(default=0.1, validator=_fraction)
    #: ... with this many hedges in a burst.
    hedge_burst: int = attrs.field(default=5, validator=positive)
    #: No hedge sooner than this, whatever the percentile says.
    min_hedge_ms: float = attrs.field(default=10.0, validator=not_negative)
    hedge_min_samples: int = attrs.field(default=20, validator=positive)
    #: Seed of the router's random choices (tests); None: from the system.
    seed: int | None = None


@attrs.define(eq=False)
class Routed:
    """A routed model: its settings and its deployments' state."""

    name: str
    spec: ModelRoute
    states: list[DeploymentState]
    requests: int = 0
    prepared: bool = False


@attrs.define(eq=False)
class Attempt:
    """One call of a hedged request to one deployment."""

    state: DeploymentState
    request: ChatRequest
    started: float
    hedge: bool = False
    usage: Usage | None = None
    completed: bool = False
    error: BaseException | None = None
    #: Ended because the other call won, not by a failure.
    abandoned: bool = False


@attrs.define(eq=False)
class Race:
    """What a hedged request's session task and its hedge's task share. Both
    run on one trio thread: a check of `winner` and the claim that follows it
    have no await between them, so exactly one call wins."""

    primary: Attempt
    routed: Routed
    call_next: Callable[[ChatRequest], AsyncIterator[Delta]]
    session: Session
    candidates: list[DeploymentState]
    delay: float
    #: Around the session task's wait for the first call's first token: the
    #: hedge's win cancels it.
    primary_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Around the hedge's task: the first call's win, or the session's end, cancels it.
    hedge_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: The hedge's task has ended.
    done: trio.Event = attrs.field(factory=trio.Event)
    hedge: Attempt | None = None
    winner: Attempt | None = None
    primary_failed: bool = False
    #: The session is past needing a hedge (it has a winner, failed over or ended).
    closed: bool = False
    #: The hedge's task was started (by the timer), and its channel to the session.
    spawned: bool = False
    send: Any = None
    receive: Any = None


class RouterProvider:
    """Lists the routed model names. A client's call never reaches it: the
    middleware sends each to a deployment. A call to a routed name made
    further in, by a middleware after the router (the retry plugin's fallback
    to a routed model), does: it is routed here the same way, each deployment's
    provider called directly."""

    name = "router"

    def __init__(self, plugin: "RouterPlugin") -> None:
        self.plugin = plugin

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name, owned_by="router") for name in self.plugin.models]

    @property
    def supports_tools(self) -> bool:
        """Function tools pass when every deployment's provider passes them."""
        return all(self.plugin.supports_tools(routed) for routed in self.plugin.models.values())

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        plugin = self.plugin
        session = plugin.runtime.sessions.find(request.session_id) if plugin.runtime is not None else None
        if request.model not in plugin.models or session is None:
            raise InternalError(f"The routed model '{request.model}' reached the router's provider outside a session.")
        stream = plugin.middleware(request, plugin.runtime.providers.stream, session)
        try:
            async for delta in stream:
                yield delta
        finally:
            await _aclose(stream)


class RouterPlugin:
    Settings = Settings
    streamvisor_contract = "1.6"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tuning = Tuning(
            alpha=settings.alpha,
            half_life=settings.half_life_seconds,
            explore=settings.explore,
            near_best=settings.near_best,
            latency_tokens=settings.latency_tokens,
            eject_after=settings.eject_after,
            eject_seconds=settings.eject_seconds,
        )
        self.rng = random.Random(settings.seed)
        self.models: dict[str, Routed] = {
            name: Routed(name, route, [DeploymentState(d.label, d, d.cost) for d in route.deployments])
            for name, route in settings.models.items()
        }
        self.runtime: Any = None
        self._nursery: trio.Nursery | None = None
        self._hedge_budget = float(settings.hedge_burst)
        #: (hedge time, order, race): the hedged requests waiting for their hedge time.
        self._timers: list[tuple[float, int, Race]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        self.routed = 0
        self.hedged = 0
        self.failovers = 0

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def register_event_types(self, register: Callable[..., None], runtime: Any) -> None:
        self.runtime = runtime
        runtime.metrics.register(_Collector(self))
        register("router.explore", "the latency strategy tried another deployment than the best, on purpose (data: model, deployment, best)")
        register("router.failover", "a deployment failed before its first token; the next one is tried (data: model, from_deployment, to_deployment, reason, status)")
        register("router.hedge", "no first token in time: the request was sent to a second deployment too (data: model, deployment, hedge, after_ms)")
        register(
            "router.hedge_lost",
            "a hedged race ended; the losing attempt was cancelled, and what it spent (data: model, winner, loser, prompt_tokens, completion_tokens, exact, cost_usd)",
        )

    @hookimpl
    def register_providers(self, register: Callable[[Any], None]) -> None:
        register(RouterProvider(self))

    @hookimpl
    def register_middleware(self, register: Callable[[Any], None]) -> None:
        register(self.middleware)

    @hookimpl
    def register_services(self, register: Callable[..., None]) -> None:
        register("hedges", self._hedges)

    @hookimpl
    def register_routes(self, register: Callable[..., None]) -> None:
        register(
            "/admin/router",
            require_admin(self.router_view),
            openapi={"summary": "What the router has learned of each deployment", "tags": ["admin"], "responses": {"200": {"description": "Routed models and their deployments"}}},
        )

    @hookimpl
    def register_status_panels(self, register: Callable[..., None]) -> None:
        register("router", self.snapshot)

    @hookimpl
    def register_health_checks(self, register: Callable[..., None]) -> None:
        register("deployments", self.check)

    @hookimpl
    def startup(self, runtime: Any) -> None:
        names = [plugin["name"] for plugin in runtime.plugin_status()]
        if "retry" in names and names.index("retry") < names.index("router"):
            raise ConfigError(
                runtime.config.source, "plugins.router", "the router listed before the retry plugin in plugins.toml (retries and circuits then act per deployment)", "retry first"
            )

    @hookimpl
    @listens_to("router.hedge_lost")
    async def on_event(self, event: Event) -> None:
        """What a lost hedge spent, kept in the store (when it keeps amounts)."""
        store = self.runtime.store if self.runtime is not None else None
        if not isinstance(store, RecordStore):
            return
        data = event.data
        month = datetime.fromtimestamp(event.at, timezone.utc).strftime("%Y-%m")
        tokens = int(data["prompt_tokens"]) + int(data["completion_tokens"])
        await store.add_amount(LOST_KIND + ":tokens", str(data["loser"]), month, tokens)
        if data.get("cost_usd"):
            await store.add_amount(LOST_KIND + ":cost_usd", str(data["loser"]), month, float(data["cost_usd"]))

    async def _hedges(self) -> None:
        """The service that owns every hedge's task, and the one timer of all
        hedged requests: a heap of their hedge times. A request costs a push
        onto it, not a task of its own; a hedge's task starts only when its
        time comes with no first token."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                timers = self._timers
                while True:
                    now = trio.current_time()
                    while timers and timers[0][0] <= now:
                        race = heapq.heappop(timers)[2]
                        if not race.closed and race.winner is None:
                            race.spawned = True
                            race.send, race.receive = trio.open_memory_channel(CHANNEL)
                            nursery.start_soon(self._hedge, race, name=f"router:hedge:{race.routed.name}")
                    self._wake = trio.Event()
                    with trio.move_on_at(timers[0][0] if timers else math.inf):
                        await self._wake.wait()
        finally:
            self._nursery = None

    def _schedule(self, race: Race, at: float) -> None:
        timers = self._timers
        if len(timers) >= TIMERS_COMPACT:
            # Requests that ended long before their hedge time would have
            # come: dropped at once rather than when it comes.
            timers[:] = [t for t in timers if not t[2].closed]
            heapq.heapify(timers)
        heapq.heappush(timers, (at, next(self._order), race))
        if timers[0][2] is race:
            self._wake.set()

    # -- choosing ------------------------------------------------------------------------

    def _prepare(self, routed: Routed) -> None:
        """At a model's first request (providers have listed their models by
        then): check each deployment is served, and price it."""
        routed.prepared = True
        for state in routed.states:
            spec = state.spec
            try:
                self.runtime.providers.resolve(spec.model, spec.provider or None)
            except APIError as exc:
                state.ejected_until, state.ejected_reason = math.inf, f"not served: {exc.message}"
                log.error("router: deployment %r of model %r is not served: %s", state.name, routed.name, exc.message)
                continue
            if state.cost is None:
                price = self.runtime.price(spec.model, Usage(500_000, 500_000))
                state.cost = None if price is None else float(price)

    def supports_tools(self, routed: Routed) -> bool:
        providers = self.runtime.providers
        for state in routed.states:
            try:
                route = providers.resolve(state.spec.model, state.spec.provider or None)
            except APIError:
                continue
            if not getattr(route.provider, "supports_tools", False):
                return False
        return True

    def middleware(self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Session) -> AsyncIterator[Delta]:
        routed = self.models.get(request.model)
        if routed is None or request.provider is not None:
            return call_next(request)
        if not routed.prepared:
            self._prepare(routed)
        now = time.monotonic()
        ranked, how = order(routed.spec.strategy, routed.states, self.tuning, self.rng, now)
        candidates = [s for s in ranked if s.ejected_until != math.inf]
        usable = [s for s in candidates if _has_room(s)]
        if not usable:
            return _failing(self._no_room(routed, candidates))
        routed.requests += 1
        self.routed += 1
        if how == "explore" and usable[0] is ranked[0]:
            best = next((s for s in ranked if s is not usable[0]), usable[0])
            usable[0].explored += 1
            session.emit("router.explore", model=routed.name, deployment=usable[0].name, best=best.name)
        delay = self._hedge_delay(routed, usable[0]) if len(usable) > 1 else None
        if delay is None or self._nursery is None:
            return self._serve(routed, request, call_next, session, candidates, usable[0])
        self._hedge_budget = min(float(self.settings.hedge_burst), self._hedge_budget + self.settings.hedge_max_share)
        return self._hedged(routed, request, call_next, session, candidates, usable[0], delay)

    def _no_room(self, routed: Routed, candidates: list[DeploymentState]) -> APIError:
        if not candidates:
            reasons = "; ".join(f"{s.name}: {s.ejected_reason}" for s in routed.states)
            return UpstreamError(f"No deployment of the model '{routed.name}' can serve it ({reasons}).")
        return Overloaded(
            f"Every deployment of the model '{routed.name}' carries its max_concurrent streams; retry shortly.", headers={"Retry-After": "1"}
        )

    def _hedge_delay(self, routed: Routed, first: DeploymentState) -> float | None:
        spec = routed.spec
        delay = spec.hedge_after_ms / 1000 if spec.hedge_after_ms else None
        if spec.hedge_after and len(first.ttft_samples) >= self.settings.hedge_min_samples:
            delay = first.percentile(float(spec.hedge_after[1:]))
        if delay is None:
            return None
        return max(delay, self.settings.min_hedge_ms / 1000)

    def _next(self, candidates: list[DeploymentState], tried: list[DeploymentState]) -> DeploymentState | None:
        return next((s for s in candidates if s not in tried and _has_room(s) and not s.ejected(time.monotonic())), None)

    def _take_hedge(self) -> bool:
        if self._hedge_budget >= 1.0:
            self._hedge_budget -= 1.0
            return True
        return False

    # -- one deployment at a time ------------------------------------------------------------

    async def _serve(
        self,
        routed: Routed,
        request: ChatRequest,
        call_next: Callable[[ChatRequest], AsyncIterator[Delta]],
        session: Session,
        candidates: list[DeploymentState],
        first: DeploymentState,
        tried: list[DeploymentState] | None = None,
        failure: BaseException | None = None,
    ) -> AsyncIterator[Delta]:
        """The deployments in turn until one reaches its first token, in the
        session's own task; each later one is a failover (so is `first` when
        `tried` holds deployments that failed already)."""
        tuning = self.tuning
        tried = list(tried or ())
        state: DeploymentState | None = first
        while state is not None:
            if tried:
                self._announce_failover(routed, session, tried[-1], state, failure)
            tried.append(state)
            state.in_flight += 1
            state.requests += 1
            started = time.monotonic()
            stream: Any = None
            answered = False
            try:
                try:
                    # Inside the try: the chain's end raises at once for a
                    # model its provider does not serve.
                    stream = call_next(_pinned(request, state))
                    head, exhausted = await _read_head(stream)
                except Exception as exc:
                    failure = unwrap(exc)
                    self._failed(state, failure)
                    if not (routed.spec.failover and _fails_over(failure)):
                        raise
                    state = self._next(candidates, tried)
                    if state is None:
                        raise
                    continue
                now = time.monotonic()
                first_token = now
                answered = True
                state.first_token(now - started, tuning, now)
                state.answered(tuning, now)
                session.set_header("X-Routed-To", state.name)
                usage: Usage | None = None
                visible = 0
                for delta in head:
                    if delta.usage is not None:
                        usage = delta.usage
                    if delta.content:
                        visible += 1
                    yield delta
                if not exhausted:
                    async for delta in stream:
                        if delta.usage is not None:
                            usage = delta.usage
                        if delta.content:
                            visible += 1
                        yield delta
                now = time.monotonic()
                state.finished(usage.completion_tokens if usage is not None else visible, now - first_token, tuning, now)
                return
            except Exception as exc:
                if answered:
                    self._failed(state, unwrap(exc))
                raise
            finally:
                state.in_flight -= 1
                await _aclose(stream)  # None when the chain's end refused it

    # -- hedged ------------------------------------------------------------------------------

    async def _hedged(
        self,
        routed: Routed,
        request: ChatRequest,
        call_next: Callable[[ChatRequest], AsyncIterator[Delta]],
        session: Session,
        candidates: list[DeploymentState],
        first: DeploymentState,
        delay: float,
    ) -> AsyncIterator[Delta]:
        """The first deployment in the session's own task, as `_serve` does;
        a task of the `hedges` service waits out the delay and, with no first
        token by then, calls the next-best deployment. Whichever reaches a
        token first wins: the hedge's win cancels the first call's wait (a
        cancel scope around reading its head, never around a `yield`), the
        first call's win cancels the hedge's task. Only a hedge that wins
        passes its deltas over the channel."""
        tuning = self.tuning
        race = Race(Attempt(first, _pinned(request, first), time.monotonic()), routed, call_next, session, candidates, delay)
        primary = race.primary
        first.in_flight += 1
        first.requests += 1
        self._schedule(race, trio.current_time() + delay)
        stream: Any = None
        failure: BaseException | None = None
        open_ = True
        try:
            head: list[Delta] = []
            exhausted = False
            try:
                with race.primary_scope:
                    stream = call_next(primary.request)
                    head, exhausted = await _read_head(stream)
            except Exception as exc:
                failure = unwrap(exc)
            if failure is None and not race.primary_scope.cancelled_caught and race.winner is None:
                # The first call won (or no hedge was needed): on in this task.
                race.winner = primary
                race.closed = True
                race.hedge_scope.cancel()
                now = time.monotonic()
                first.first_token(now - primary.started, tuning, now)
                first.answered(tuning, now)
                if race.hedge is not None and race.hedge.error is None:
                    self._hedge_settled(race, primary, race.hedge, now)
                session.set_header("X-Routed-To", first.name)
                # The relay loop of `_serve`, written out again: shared, it
                # would be one more generator layer for every delta.
                usage: Usage | None = None
                visible = 0
                try:
                    for delta in head:
                        if delta.usage is not None:
                            usage = delta.usage
                        if delta.content:
                            visible += 1
                        yield delta
                    if not exhausted:
                        async for delta in stream:
                            if delta.usage is not None:
                                usage = delta.usage
                            if delta.content:
                                visible += 1
                            yield delta
                except Exception as exc:
                    self._failed(first, unwrap(exc))
                    raise
                primary.usage = usage
                done = time.monotonic()
                first.finished(usage.completion_tokens if usage is not None else visible, done - now, tuning, done)
                return
            # The first call failed, or lost to the hedge: it is closed now.
            primary.usage = next((d.usage for d in reversed(head) if d.usage is not None), None)
            open_ = False
            first.in_flight -= 1
            await _aclose(stream)
            if failure is not None:
                race.primary_failed = True
                self._failed(first, failure)
                if not (routed.spec.failover and _fails_over(failure)):
                    raise failure  # the request's own fault: a hedge would fail alike
                if race.hedge is None:
                    race.closed = True  # not hedged yet: fail over as `_serve` does
                    race.hedge_scope.cancel()
            tried = [first]
            hedge = race.hedge
            if hedge is not None:
                # The hedge won, or is the request's chance now: its deltas.
                tried.append(hedge.state)
                while True:
                    _, item = await race.receive.receive()
                    if item is _END:
                        break
                    yield item
                if race.winner is hedge:
                    if hedge.completed:
                        return
                    # Past its first token: the client has output, nothing fails over.
                    raise hedge.error or UpstreamError(f"The call to deployment '{hedge.state.name}' was cancelled.")
                failure = hedge.error or failure
            following = self._next(candidates, tried) if routed.spec.failover and failure is not None and _fails_over(failure) else None
            if following is None:
                raise failure or UpstreamError(f"The calls to the deployments of '{routed.name}' were cancelled.")
            async for delta in self._serve(routed, request, call_next, session, candidates, following, tried, failure):
                yield delta
        finally:
            race.closed = True
            race.hedge_scope.cancel()
            if open_:
                first.in_flight -= 1
                await _aclose(stream)
            if race.spawned:
                race.receive.close()
                with _bounded_shield():
                    await race.done.wait()
            try:
                self._settle_losses(routed, session, request, race)
            except Exception:
                log.exception("router: recording what a lost hedge spent failed")

    async def _hedge(self, race: Race) -> None:
        """A hedged request's second call, in a task of the `hedges` service,
        started by its timer. A failure is kept on the attempt, never raised
        into the service; cancellation (the first call won, the session
        ended) passes through after the last word."""
        routed, session, send = race.routed, race.session, race.send
        hedge: Attempt | None = None
        stream: Any = None
        try:
            with race.hedge_scope, log_context(session.request_id, session.id):
                second = self._next(race.candidates, [race.primary.state])
                if second is None or race.winner is not None or not self._take_hedge():
                    return
                hedge = race.hedge = Attempt(second, _pinned(race.primary.request, second), time.monotonic(), hedge=True)
                self.hedged += 1
                second.hedges_started += 1
                second.in_flight += 1
                second.requests += 1
                session.emit("router.hedge", model=routed.name, deployment=race.primary.state.name, hedge=second.name, after_ms=round(race.delay * 1000, 1))
                try:
                    stream = race.call_next(hedge.request)
                    head, exhausted = await _read_head(stream)
                    hedge.usage = next((d.usage for d in reversed(head) if d.usage is not None), None)
                    if race.winner is not None:
                        return
                    race.winner = hedge
                    race.primary_scope.cancel()
                    won = time.monotonic()
                    second.first_token(won - hedge.started, self.tuning, won)
                    second.answered(self.tuning, won)
                    if not race.primary_failed:
                        self._hedge_settled(race, hedge, race.primary, won)
                    session.set_header("X-Routed-To", second.name)
                    for delta in head:
                        await send.send((hedge, delta))
                    if not exhausted:
                        async for delta in stream:
                            if delta.usage is not None:
                                hedge.usage = delta.usage
                            await send.send((hedge, delta))
                    hedge.completed = True
                    end = time.monotonic()
                    usage = hedge.usage
                    second.finished(usage.completion_tokens if usage is not None else 0, end - won, self.tuning, end)
                except Exception as exc:
                    hedge.error = unwrap(exc)
                    if race.winner is not race.primary:
                        self._failed(second, hedge.error)
                finally:
                    second.in_flight -= 1
                    with _bounded_shield():
                        await _aclose(stream)
        finally:
            with _bounded_shield():
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send((hedge, _END))
            race.done.set()

    def _hedge_settled(self, race: "Race", winner: Attempt, loser: Attempt, now: float) -> None:
        """A race with two calls in it ended at `winner`'s first token."""
        winner.state.hedges_won += 1
        loser.state.hedges_lost += 1
        loser.abandoned = True
        loser.state.waited(now - loser.started, self.tuning, now)

    def _settle_losses(self, routed: Routed, session: Session, request: ChatRequest, race: "Race") -> None:
        """What the losing call of a hedged race spent: its own usage when its
        upstream said, else the winner's prompt (the same prompt), else an
        estimate. Recorded on the deployment and as a `router.hedge_lost` event."""
        winner = race.winner
        loser = race.primary if winner is race.hedge else race.hedge
        if winner is None or loser is None or not loser.abandoned:
            return
        if loser.usage is not None:
            tokens, completion, exact = loser.usage.prompt_tokens, loser.usage.completion_tokens, loser.usage.exact
        elif winner.usage is not None:
            tokens, completion, exact = winner.usage.prompt_tokens, 0, False
        else:
            tokens, completion, exact = _estimate_prompt(request), 0, False
        cost = self.runtime.price(loser.state.spec.model, Usage(tokens, completion, exact=exact)) if self.runtime is not None else None
        state = loser.state
        state.lost_prompt_tokens += tokens
        state.lost_completion_tokens += completion
        state.lost_cost_usd += cost or 0.0
        session.emit(
            "router.hedge_lost",
            model=routed.name,
            winner=winner.state.name,
            loser=state.name,
            prompt_tokens=tokens,
            completion_tokens=completion,
            exact=exact,
            cost_usd=cost,
        )

    # -- bookkeeping ---------------------------------------------------------------------------

    def _failed(self, state: DeploymentState, error: BaseException) -> None:
        now = time.monotonic()
        if isinstance(error, APIError) and error.code == "circuit_open":
            state.failed(self.tuning, now, _retry_after(error) or self.tuning.eject_seconds, "its circuit is open")
            return
        if _fails_over(error):
            state.failed(self.tuning, now, reason=_reason(error))

    def _announce_failover(self, routed: Routed, session: Session, source: DeploymentState, target: DeploymentState, error: BaseException | None) -> None:
        self.failovers += 1
        log.info("router: %s failed before its first token (%s); trying %s", source.name, _reason(error), target.name)
        session.emit(
            "router.failover",
            model=routed.name,
            from_deployment=source.name,
            to_deployment=target.name,
            reason=_reason(error),
            status=error.status if isinstance(error, APIError) else None,
        )

    # -- what it shows ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        models = {}
        for name, routed in self.models.items():
            prior = priors(routed.states)
            models[name] = {
                "strategy": routed.spec.strategy,
                "hedge_after_ms": routed.spec.hedge_after_ms or None,
                "hedge_after": routed.spec.hedge_after or None,
                "failover": routed.spec.failover,
                "requests": routed.requests,
                "deployments": [s.describe(prior, self.tuning, now, routed.requests) for s in routed.states],
            }
        return {
            "models": models,
            "requests": self.routed,
            "failovers": self.failovers,
            "hedging": {
                "hedged": self.hedged,
                "share": round(self.hedged / self.routed, 4) if self.routed else 0.0,
                "max_share": self.settings.hedge_max_share,
                "budget": round(self._hedge_budget, 3),
            },
        }

    async def router_view(self) -> Any:
        return json_response(self.snapshot())

    async def check(self) -> Health:
        for routed in self.models.values():
            if not routed.prepared:
                self._prepare(routed)
        unserved = {
            name: [s.name for s in routed.states if s.ejected_until == math.inf] for name, routed in self.models.items()
        }
        dead = [name for name, routed in self.models.items() if routed.prepared and len(unserved[name]) == len(routed.states)]
        return Health(not dead, {"unserved": {k: v for k, v in unserved.items() if v}, "models_without_deployment": dead})


class _Collector:
    """The router's metrics, read from its state when /metrics is scraped:
    nothing per request."""

    def __init__(self, plugin: RouterPlugin) -> None:
        self.plugin = plugin

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        now = time.monotonic()
        labels = ["model", "deployment"]
        requests = CounterMetricFamily("streamvisor_router_requests", "Calls routed to a deployment (hedges and failovers included).", labels=labels)
        failures = CounterMetricFamily("streamvisor_router_failures", "Calls to a deployment that failed.", labels=labels)
        in_flight = GaugeMetricFamily("streamvisor_router_in_flight", "Streams a deployment carries now.", labels=labels)
        ttft = GaugeMetricFamily("streamvisor_router_ttft_seconds", "The learned time to first token of a deployment.", labels=labels)
        tps = GaugeMetricFamily("streamvisor_router_tokens_per_second", "The learned tokens per second of a deployment.", labels=labels)
        errors = GaugeMetricFamily("streamvisor_router_error_rate", "The learned error rate of a deployment.", labels=labels)
        hedges = CounterMetricFamily("streamvisor_router_hedges", "Hedged races a deployment took part in, by outcome.", labels=[*labels, "outcome"])
        lost = CounterMetricFamily("streamvisor_router_hedge_lost_tokens", "Tokens spent by a deployment's attempts that lost a hedge.", labels=labels)
        for name, routed in self.plugin.models.items():
            prior = priors(routed.states)
            for state in routed.states:
                key = [name, state.name]
                requests.add_metric(key, state.requests)
                failures.add_metric(key, state.failures)
                in_flight.add_metric(key, state.in_flight)
                estimate = state.ttft.read(prior[0], self.plugin.tuning.half_life, now)
                if estimate is not None:
                    ttft.add_metric(key, estimate)
                rate = state.tps.read(prior[1], self.plugin.tuning.half_life, now)
                if rate is not None:
                    tps.add_metric(key, rate)
                errors.add_metric(key, state.errors.read(0.0, self.plugin.tuning.half_life, now) or 0.0)
                hedges.add_metric([*key, "started"], state.hedges_started)
                hedges.add_metric([*key, "won"], state.hedges_won)
                hedges.add_metric([*key, "lost"], state.hedges_lost)
                lost.add_metric(key, state.lost_prompt_tokens + state.lost_completion_tokens)
        yield from (requests, failures, in_flight, ttft, tps, errors, hedges, lost)


# -- helpers ---------------------------------------------------------------------------------------


def _pinned(request: ChatRequest, state: DeploymentState) -> ChatRequest:
    return attrs.evolve(request, model=state.spec.model, provider=state.spec.provider or None)


def _has_room(state: DeploymentState) -> bool:
    return not state.spec.max_concurrent or state.in_flight < state.spec.max_concurrent


def _fails_over(error: BaseException) -> bool:
    """Whether another deployment may do better: the upstream is down, slow,
    failing or limiting us. A 4xx of the client's own request would fail anywhere."""
    return isinstance(error, APIError) and (error.status >= 500 or error.status == 429)


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown"
    if isinstance(error, APIError):
        return error.code or f"status_{error.status}"
    return type(error).__name__


def _retry_after(error: APIError) -> float | None:
    value = (error.headers or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _estimate_prompt(request: ChatRequest) -> int:
    """About four characters a token, for an upstream that never said."""
    return max(1, sum(len(message_text(m)) for m in request.messages) // 4)


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _read_head(stream: AsyncIterator[Delta]) -> tuple[list[Delta], bool]:
    """A call's deltas up to its first visible one (role-only and usage-only
    ones before it are kept), and whether the stream ended there."""
    head: list[Delta] = []
    while len(head) < HEAD_LIMIT:
        try:
            delta = await stream.__anext__()
        except StopAsyncIteration:
            return head, True
        head.append(delta)
        if delta.visible:
            break
    return head, False


def _bounded_shield() -> trio.CancelScope:
    """A shield for clean-up that must not be cut by the cancellation that
    caused it, for at most `CLOSE_GRACE` seconds."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE)


async def _failing(error: APIError) -> AsyncIterator[Delta]:
    raise error
    yield Delta()
