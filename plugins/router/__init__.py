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

A call without hedging runs in the session's own task: the chosen deployment,
then, when it fails before its first token, the next one (`router.failover`).
With hedging (`hedge_after_ms`, or `hedge_after = "p90"`), each attempt runs in
a task of the plugin's `hedges` service and hands its deltas to the session
over a bounded channel: the first attempt's, and after the hedge delay with no
first token, the next-best deployment's. The first to produce a token wins; the
other is cancelled at once, which closes its upstream connection. Only the
winner's deltas leave the middleware. The session's generator never holds a
nursery or a cancel scope across a `yield`, so nothing the plugin does can
cancel the code that reads it.
"""

from __future__ import annotations

import contextlib
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
    """One call to one deployment that runs in a task of the `hedges` service."""

    state: DeploymentState
    request: ChatRequest
    started: float
    hedge: bool = False
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    head: list[Delta] = attrs.field(factory=list)
    usage: Usage | None = None
    completed: bool = False
    error: BaseException | None = None
    #: Ended by the session (it lost, or the session ended), not by a failure.
    abandoned: bool = False


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
        stream = plugin.middleware(request, plugin.direct, session)
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
        """The service that owns every hedged attempt's task."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await trio.sleep_forever()
        finally:
            self._nursery = None

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

    def direct(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """A deployment's provider, called as the end of the chain would."""
        route = self.runtime.providers.resolve(request.model, request.provider)
        if route.target != request.model:
            request = attrs.evolve(request, model=route.target)
        return route.provider.stream(request)

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
        return self._race(routed, request, call_next, session, candidates, usable[0], delay)

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
    ) -> AsyncIterator[Delta]:
        """The deployments in turn until one reaches its first token, in the
        session's own task; each later one is a failover."""
        tuning = self.tuning
        tried: list[DeploymentState] = []
        state: DeploymentState | None = first
        failure: BaseException | None = None
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
                head: list[Delta] = []
                exhausted = False
                try:
                    # Inside the try: the chain's end raises at once for a
                    # model its provider does not serve.
                    stream = call_next(_pinned(request, state))
                    while True:
                        try:
                            delta = await stream.__anext__()
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        head.append(delta)
                        if delta.visible or len(head) >= HEAD_LIMIT:
                            break
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

    async def _race(
        self,
        routed: Routed,
        request: ChatRequest,
        call_next: Callable[[ChatRequest], AsyncIterator[Delta]],
        session: Session,
        candidates: list[DeploymentState],
        first: DeploymentState,
        delay: float,
    ) -> AsyncIterator[Delta]:
        """Attempts in tasks of the `hedges` service, the first to a token wins."""
        send, receive = trio.open_memory_channel(CHANNEL)
        attempts: list[Attempt] = []
        tried: list[DeploymentState] = []
        running: list[Attempt] = []
        winner: Attempt | None = None
        hedge_at: float | None = trio.current_time() + delay  # trio's clock: move_on_at reads it
        hedged = False
        ended = False  # the winner's _END was taken
        failure: BaseException | None = None

        def start(state: DeploymentState, hedge: bool = False) -> None:
            if self._nursery is None:  # the service is restarting
                raise Overloaded("The router is restarting; retry shortly.", headers={"Retry-After": "1"})
            attempt = Attempt(state, _pinned(request, state), time.monotonic(), hedge)
            attempts.append(attempt)
            running.append(attempt)
            tried.append(state)
            state.in_flight += 1
            state.requests += 1
            self._nursery.start_soon(self._attempt, attempt, call_next, send, name=f"router:{state.name}")

        try:
            start(first)
            while winner is None:
                attempt: Attempt | None = None
                if hedge_at is not None:
                    with trio.move_on_at(hedge_at):
                        attempt, item = await receive.receive()
                    if attempt is None:
                        hedge_at, hedged = None, True  # at most one hedge per request
                        second = self._next(candidates, tried)
                        if second is not None and self._take_hedge():
                            self.hedged += 1
                            second.hedges_started += 1
                            session.emit("router.hedge", model=routed.name, deployment=first.name, hedge=second.name, after_ms=round(delay * 1000, 1))
                            start(second, hedge=True)
                        continue
                else:
                    attempt, item = await receive.receive()
                if attempt not in running:
                    continue  # a loser's last words
                if item is not _END:
                    if item.usage is not None:
                        attempt.usage = item.usage
                    attempt.head.append(item)
                    if item.visible or len(attempt.head) >= HEAD_LIMIT:
                        winner = attempt
                    continue
                if attempt.completed:
                    winner, ended = attempt, True  # it ended without a visible delta: an empty answer
                    continue
                running.remove(attempt)
                failure = attempt.error or UpstreamError(f"The call to deployment '{attempt.state.name}' was cancelled.")
                if running:
                    continue  # the other attempt may still answer
                following = self._next(candidates, tried) if routed.spec.failover and _fails_over(failure) else None
                if following is None:
                    raise failure
                self._announce_failover(routed, session, attempt.state, following, failure)
                start(following)
                if not hedged:
                    hedge_at = trio.current_time() + delay  # the hedge clock starts again with the new first attempt
                    first = following

            now = time.monotonic()
            winner.state.first_token(now - winner.started, self.tuning, now)
            winner.state.answered(self.tuning, now)
            for loser in running:
                if loser is not winner:
                    loser.abandoned = True
                    loser.scope.cancel()
                    loser.state.waited(now - loser.started, self.tuning, now)
            if len(attempts) > 1 and any(a.hedge for a in attempts):
                winner.state.hedges_won += 1
                for loser in attempts:
                    if loser is not winner and loser.abandoned:
                        loser.state.hedges_lost += 1
            session.set_header("X-Routed-To", winner.state.name)
            for delta in winner.head:
                yield delta
            first_token = now
            visible = sum(1 for d in winner.head if d.content)
            while not ended:
                attempt, item = await receive.receive()
                if attempt is not winner:
                    continue
                if item is _END:
                    break
                if item.usage is not None:
                    winner.usage = item.usage
                if item.content:
                    visible += 1
                yield item
            if not winner.completed:
                error = winner.error or UpstreamError(f"The call to deployment '{winner.state.name}' was cancelled.")
                raise error
            now = time.monotonic()
            winner.state.finished(winner.usage.completion_tokens if winner.usage is not None else visible, now - first_token, self.tuning, now)
        finally:
            receive.close()
            for attempt in running:
                # Still running: a loser, or (the session ended early) any attempt.
                attempt.abandoned = attempt.abandoned or attempt is not winner
                attempt.scope.cancel()
            with _bounded_shield():
                for attempt in attempts:
                    await attempt.done.wait()
            try:
                self._settle_losses(routed, session, request, attempts, winner)
            except Exception:
                log.exception("router: recording what a lost hedge spent failed")

    async def _attempt(self, attempt: Attempt, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], send: trio.MemorySendChannel) -> None:
        """One hedged attempt, in the `hedges` service: its deltas to the session,
        then `_END`. A failure is kept on the attempt, never raised into the
        service; cancellation passes through after the last word is sent."""
        stream: Any = None
        try:
            with attempt.scope:
                stream = call_next(attempt.request)
                try:
                    async for delta in stream:
                        await send.send((attempt, delta))
                finally:
                    with _bounded_shield():
                        await _aclose(stream)
                attempt.completed = True
        except Exception as exc:
            attempt.error = unwrap(exc)
            if not attempt.abandoned:
                self._failed(attempt.state, attempt.error)
        finally:
            attempt.state.in_flight -= 1
            # The session waits for this word before a winner is known (it is
            # reading then); after, it reads on as its client does, or has
            # closed the channel. Bounded all the same: a task never outlives
            # its session by more than the grace.
            with _bounded_shield():
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send((attempt, _END))
            attempt.done.set()

    def _settle_losses(self, routed: Routed, session: Session, request: ChatRequest, attempts: list[Attempt], winner: Attempt | None) -> None:
        """What each losing attempt of a hedged race spent: its own usage when
        its upstream said, else the winner's prompt (the same prompt), else an
        estimate. Recorded on the deployment and as a `router.hedge_lost` event."""
        if winner is None or len(attempts) < 2:
            return
        prompt = winner.usage.prompt_tokens if winner.usage is not None else None
        for loser in attempts:
            if loser is winner or not loser.abandoned:
                continue
            if loser.usage is not None:
                tokens, completion, exact = loser.usage.prompt_tokens, loser.usage.completion_tokens, loser.usage.exact
            elif prompt is not None:
                tokens, completion, exact = prompt, 0, False
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


def _bounded_shield() -> trio.CancelScope:
    """A shield for clean-up that must not be cut by the cancellation that
    caused it, for at most `CLOSE_GRACE` seconds."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE)


async def _failing(error: APIError) -> AsyncIterator[Delta]:
    raise error
    yield Delta()
