"""The `retry` plugin: retries, fallback chains and a circuit breaker per provider.

It owns one middleware around the provider call and the state that middleware
keeps: a `CircuitBreaker` per provider, the Prometheus metrics that show them
(retries by reason, fallbacks, circuit state) and the `retry:circuits` readiness
check.

Only the step from "call the provider" to "its first visible delta" is ever
retried. Once the middleware has yielded a delta, a failure is not retried and
no fallback is tried (the client already has output that a second attempt would
duplicate): the error propagates and the core ends the stream with a terminal
error event, keeping the usage so far.

Retries are a plain loop (`_with_retries`): an attempt returns its outcome as
a value (`Opened` or `Failure`), catching `Exception`s itself, so cancellation
(a stop, a disconnect) is never retried: it passes through the attempt, and a
disconnect during a backoff wait cancels `trio.sleep` directly. The policy of
one model on one provider is one `Policy`: the plugin's own table, then the
provider's, then the model's, each setting only what it changes.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import math
import random
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Literal

import attrs
import httpx
import trio
from prometheus_client import Counter, Gauge

from streamvisor.hooks import (
    APIError,
    ChatRequest,
    Delta,
    Health,
    RateLimited,
    Session,
    UpstreamError,
    UpstreamTimeout,
    at_least_one,
    hookimpl,
    httpclient,
    not_negative,
    positive,
    unwrap,
)

log = logging.getLogger("streamvisor.plugins.retry")

#: The error classes that may be retried, as `retry_on` names them.
Reason = Literal["connect", "timeout", "rate_limit", "server_error"]
RETRYABLE: tuple[str, ...] = ("connect", "timeout", "rate_limit", "server_error")
#: The failures that count against a provider's circuit. A 429 does not: the
#: upstream is up and says when to come back; a refused request (4xx) is the
#: request's fault, not the upstream's.
CIRCUIT_FAILURES = frozenset({"connect", "timeout", "server_error"})
#: Why a model gives up in favour of its fallbacks: an upstream-side failure.
#: A refused request ("client_error") or a bug ("internal") is raised as it is.
FALLBACK_REASONS = frozenset(RETRYABLE) | {"circuit_open"}

#: Leading deltas with nothing visible (usage only) read while looking for the
#: first visible one; past this many the stream counts as started.
HEAD_LIMIT = 64
#: The longest fallback chain a model may have.
MAX_FALLBACKS = 16
#: How far down an error's __cause__/__context__ chain a connect error is looked for.
CAUSE_DEPTH = 8

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
#: The value of the circuit gauge per state.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


# -- settings --------------------------------------------------------------------


def _multiplier(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be 1 or more, got {value}")


@attrs.frozen
class Policy:
    """The retry policy of one model on one provider.

    Every field may be left unset (None) in a table: `[plugins.retry]` itself,
    `[plugins.retry.providers.NAME]` and `[plugins.retry.models.NAME]` are
    merged in that order onto `DEFAULT_POLICY`, each setting only what it
    changes.
    """

    #: Attempts in all, the first one included (1: never retry).
    attempts: int | None = attrs.field(default=None, validator=at_least_one)
    #: Seconds from the first attempt: no wait and no new attempt goes past it.
    deadline: float | None = attrs.field(default=None, validator=positive)
    #: Backoff before retry n (n = 1, 2, ...): min(backoff_max,
    #: backoff_initial * backoff_multiplier ** (n - 1)) + uniform(0, jitter).
    backoff_initial: float | None = attrs.field(default=None, validator=not_negative)
    backoff_max: float | None = attrs.field(default=None, validator=not_negative)
    backoff_multiplier: float | None = attrs.field(default=None, validator=_multiplier)
    jitter: float | None = attrs.field(default=None, validator=not_negative)
    retry_on: tuple[Reason, ...] | None = None

    def merge(self, override: "Policy | None") -> "Policy":
        """This policy with what `override` sets replacing it."""
        if override is None:
            return self
        changes = {f.name: getattr(override, f.name) for f in attrs.fields(Policy) if getattr(override, f.name) is not None}
        return attrs.evolve(self, **changes) if changes else self

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first retry)."""
        assert self.backoff_initial is not None and self.backoff_max is not None and self.backoff_multiplier is not None
        try:
            wait = self.backoff_initial * self.backoff_multiplier ** (retry - 1)
        except OverflowError:
            wait = self.backoff_max
        return min(wait, self.backoff_max) + random.uniform(0, self.jitter or 0.0)


#: What a table leaves unset.
DEFAULT_POLICY = Policy(
    attempts=3, deadline=30.0, backoff_initial=0.5, backoff_max=8.0, backoff_multiplier=2.0, jitter=0.5, retry_on=RETRYABLE
)


@attrs.frozen
class CircuitSettings:
    """`[plugins.retry.circuit]`: one breaker per provider."""

    enabled: bool = True
    #: This many failures (connect errors, timeouts, 5xx) ...
    failures: int = attrs.field(default=5, validator=at_least_one)
    #: ... within this many seconds open the circuit ...
    window: float = attrs.field(default=30.0, validator=positive)
    #: ... for this many seconds; then one probe request is let through.
    cooldown: float = attrs.field(default=30.0, validator=positive)


def _fallback_chains(instance: Any, attribute: attrs.Attribute, value: dict[str, list[str]]) -> None:
    for model, chain in value.items():
        if len(chain) > MAX_FALLBACKS:
            raise ValueError(f"fallbacks.{model} names {len(chain)} models; at most {MAX_FALLBACKS} are allowed")
        if model in chain:
            raise ValueError(f"fallbacks.{model} names the model itself")
        if len(set(chain)) != len(chain):
            raise ValueError(f"fallbacks.{model} names a model twice")


@attrs.frozen
class Settings(Policy):
    """`[plugins.retry]`: the default policy (the `Policy` fields), the
    per-provider and per-model policies, fallback chains and the circuit."""

    #: Policies by provider name, then by model name (a model's wins).
    providers: dict[str, Policy] = attrs.field(factory=dict)
    models: dict[str, Policy] = attrs.field(factory=dict)
    #: A model's fallbacks, tried in order when it gives up before its first chunk.
    fallbacks: dict[str, list[str]] = attrs.field(factory=dict, validator=_fallback_chains)
    circuit: CircuitSettings = attrs.field(factory=CircuitSettings)


# -- errors and their classes -------------------------------------------------------


class CircuitOpen(UpstreamError):
    """A provider is skipped: its circuit is open (or a probe is in flight)."""

    status = 503
    code = "circuit_open"


def _is_connect_error(error: BaseException) -> bool:
    """Whether the provider raised this because the upstream could not be reached
    (the openai provider chains its `streamvisor.core.httpclient` error as the
    cause; httpx errors, which other providers may chain, count too)."""
    seen: BaseException | None = error
    for _ in range(CAUSE_DEPTH):
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            return False
        if isinstance(seen, (httpclient.TimeoutError, httpx.TimeoutException)):
            return False
        if isinstance(seen, (httpclient.ConnectError, httpclient.ReadError, httpclient.WriteError, httpx.TransportError, OSError)):
            return True
    return False


def classify(error: BaseException) -> str:
    """The reason an attempt failed: one of RETRYABLE, or "client_error" (the
    request was refused: 4xx other than 429) or "internal" (not an APIError)."""
    if not isinstance(error, APIError):
        return "internal"
    if isinstance(error, RateLimited) or error.status == 429:
        return "rate_limit"
    if isinstance(error, UpstreamTimeout) or error.status == 504:
        return "timeout"
    if error.status >= 500:
        return "connect" if _is_connect_error(error) else "server_error"
    return "client_error"


def retry_after_seconds(error: BaseException) -> float | None:
    """The `Retry-After` of an error, in seconds (delta-seconds or an HTTP date)."""
    headers = getattr(error, "headers", None) or {}
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- the circuit breaker ------------------------------------------------------------


@attrs.define(eq=False)
class CircuitBreaker:
    """closed -> (failures within window) -> open -> (cooldown) -> half_open, where
    one probe is let through: its success closes the circuit, its failure opens it
    again. A probe that ends without a verdict (cancelled, refused as a bad
    request) frees the slot for the next request."""

    provider: str
    settings: CircuitSettings
    clock: Callable[[], float] = time.monotonic
    _state: str = CLOSED
    #: Times of the recent failures; bounded: only the last `failures` matter.
    _recent: collections.deque[float] = attrs.field(init=False)
    _opened_at: float = 0.0
    _probing: bool = False
    opened: int = 0
    #: Called with the breaker each time the circuit opens.
    on_open: Callable[["CircuitBreaker"], None] | None = None

    def __attrs_post_init__(self) -> None:
        self._recent = collections.deque(maxlen=self.settings.failures)

    @property
    def state(self) -> str:
        """The state now: an open circuit whose cooldown has passed is half-open."""
        if self._state == OPEN and self.clock() - self._opened_at >= self.settings.cooldown:
            return HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until the circuit lets a probe through (0 when it would now)."""
        if self._state == OPEN:
            return max(0.0, self.settings.cooldown - (self.clock() - self._opened_at))
        return 0.0

    def refuses(self) -> bool:
        """Whether a request now would be refused (open, or a probe is in flight)."""
        if not self.settings.enabled:
            return False
        state = self.state
        return state == OPEN or (state == HALF_OPEN and self._probing)

    def admit(self) -> str | None:
        """Let a request through: "pass", "probe" (the one half-open request; report
        its end with succeeded/failed/abandoned), or None (refused)."""
        if not self.settings.enabled:
            return "pass"
        state = self.state
        if state == CLOSED:
            return "pass"
        if state == HALF_OPEN and not self._probing:
            self._state, self._probing = HALF_OPEN, True
            return "probe"
        return None

    def succeeded(self) -> None:
        # A success seen while open comes from a request admitted before the
        # circuit opened: it proves little, and only the probe may close it.
        if self._state != OPEN:
            self._state, self._probing = CLOSED, False
            self._recent.clear()

    def failed(self) -> None:
        now = self.clock()
        if self._state == HALF_OPEN:
            self._open(now)
        elif self._state == CLOSED:
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self.settings.window:
                self._recent.popleft()
            if len(self._recent) >= self.settings.failures:
                self._open(now)

    def abandoned(self) -> None:
        if self._state == HALF_OPEN:
            self._probing = False

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._probing = OPEN, now, False
        self._recent.clear()
        self.opened += 1
        log.warning(
            "circuit of provider %r is open for %g s after %d failures", self.provider, self.settings.cooldown, self.settings.failures
        )
        if self.on_open is not None:
            self.on_open(self)

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "state": state,
            "ready": state != OPEN,
            "recent_failures": len(self._recent),
            "retry_in": round(self.retry_in(), 3),
            "opened": self.opened,
        }


# -- attempts ------------------------------------------------------------------------


@attrs.frozen
class Opened:
    """An attempt that reached its first visible delta: the stream to go on with."""

    stream: AsyncIterator[Delta]
    head: list[Delta]
    exhausted: bool
    model: str
    provider: str


@attrs.frozen
class Failure:
    """An attempt that failed before its first visible delta."""

    error: BaseException
    reason: str
    model: str
    provider: str

    @property
    def retry_after(self) -> float | None:
        return retry_after_seconds(self.error) if self.reason == "rate_limit" else None

    def event_data(self) -> dict[str, Any]:
        error = self.error
        return {
            "reason": self.reason,
            "error": error.message if isinstance(error, APIError) else type(error).__name__,
            "error_type": error.code if isinstance(error, APIError) else type(error).__name__,
            "status": error.status if isinstance(error, APIError) else None,
        }


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _read_head(stream: AsyncIterator[Delta]) -> tuple[list[Delta], bool]:
    """Read up to the first visible delta (keeping the usage-only ones before it).
    Returns the deltas read and whether the stream ended."""
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


# -- the plugin ---------------------------------------------------------------------


class RetryPlugin:
    Settings = Settings
    streamvisor_contract = "1.6"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default_policy = DEFAULT_POLICY.merge(settings)
        self.breakers: dict[str, CircuitBreaker] = {}

    # -- hooks ----------------------------------------------------------------

    @hookimpl
    def register_event_types(self, register: Callable[..., None], runtime: Any) -> None:
        self.runtime = runtime
        self.retries = Counter(
            "streamvisor_upstream_retries",
            "Retries of a provider call before its first chunk, by the reason of the failed attempt.",
            ["reason", "provider"],
            registry=runtime.metrics,
        )
        self.fallbacks = Counter(
            "streamvisor_upstream_fallbacks",
            "Switches to a fallback model, by the reason the previous model gave up.",
            ["reason"],
            registry=runtime.metrics,
        )
        self.circuit_state = Gauge(
            "streamvisor_upstream_circuit_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
            ["provider"],
            registry=runtime.metrics,
        )
        register("retry", "the provider call is retried before its first chunk (data: attempt, delay, model, provider, reason, error, error_type, status)")
        register("fallback", "the call moves to a fallback model before its first chunk (data: from_model, from_provider, to_model, to_provider, reason, error, error_type, status)")
        register("upstream.circuit_opened", "a provider's circuit breaker opened; no session (data: provider, failures, window_seconds, cooldown_seconds, times_opened)")

    @hookimpl
    def startup(self, runtime: Any) -> None:
        for provider in runtime.providers:
            self.breaker(provider.name)

    @hookimpl
    def register_middleware(self, register: Callable[[Any], None]) -> None:
        register(self.middleware)

    @hookimpl
    def register_health_checks(self, register: Callable[..., None]) -> None:
        register("circuits", self.check_circuits)

    @hookimpl
    def register_status_panels(self, register: Callable[..., None]) -> None:
        register("circuits", self.circuits)

    # -- state ------------------------------------------------------------------

    def breaker(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = self.breakers[provider] = CircuitBreaker(provider, self.settings.circuit, on_open=self._opened)
            self.circuit_state.labels(provider).set_function(lambda: STATE_VALUES[breaker.state])
        return breaker

    def _opened(self, breaker: CircuitBreaker) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.emit(
                "upstream.circuit_opened",
                provider=breaker.provider,
                failures=breaker.settings.failures,
                window_seconds=breaker.settings.window,
                cooldown_seconds=breaker.settings.cooldown,
                times_opened=breaker.opened,
            )

    def policy(self, model: str, provider: str) -> Policy:
        """The plugin's policy, then the provider's table, then the model's: the most specific wins."""
        return self.default_policy.merge(self.settings.providers.get(provider)).merge(self.settings.models.get(model))

    def circuits(self) -> dict[str, Any]:
        return {name: breaker.describe() for name, breaker in sorted(self.breakers.items())}

    async def check_circuits(self) -> Health:
        circuits = self.circuits()
        open_ = [name for name, circuit in circuits.items() if not circuit["ready"]]
        return Health(not open_, {"open": open_, "circuits": circuits})

    # -- the middleware -------------------------------------------------------------

    async def middleware(
        self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Session
    ) -> AsyncIterator[Delta]:
        opened = await self._open(request, call_next, session)
        stream = opened.stream
        try:
            for delta in opened.head:
                yield delta
            if not opened.exhausted:
                async for delta in stream:
                    yield delta
        except Exception as exc:
            # Past the first chunk nothing is retried or replaced: the client has
            # output already. The error goes on to the core, which ends the stream
            # with an error event; the circuit still hears of a broken upstream.
            if classify(unwrap(exc)) in CIRCUIT_FAILURES:
                self.breaker(opened.provider).failed()
            raise
        finally:
            await _aclose(stream)

    async def _open(self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], session: Session) -> Opened:
        """Reach a first visible delta: the model with its retries, then each fallback."""
        chain = [request.model, *self.settings.fallbacks.get(request.model, ())]
        last: Failure | None = None
        for index, model in enumerate(chain):
            try:
                # The first model keeps a pinned provider (a router's deployment);
                # a fallback goes to whichever provider serves its name.
                provider = self.runtime.providers.resolve(model, request.provider if index == 0 else None).provider.name
            except APIError:
                if index == 0:
                    raise  # ModelNotFound: the client's (or an outer middleware's) model
                log.warning("fallback model %r of %r is not served by any provider; skipped", model, request.model)
                continue
            if last is not None:
                self._announce_fallback(session, last, model, provider)
            attempt_request = request if index == 0 else attrs.evolve(request, model=model, provider=None)
            outcome = await self._with_retries(attempt_request, call_next, model, provider, session)
            if isinstance(outcome, Opened):
                if index > 0:
                    session.set_header("X-Fallback-Model", model)
                return outcome
            if outcome.reason not in FALLBACK_REASONS:
                raise outcome.error
            last = outcome
        assert last is not None  # the chain's first model always ends in an outcome
        raise last.error

    async def _with_retries(
        self, request: ChatRequest, call_next: Callable[[ChatRequest], AsyncIterator[Delta]], model: str, provider: str, session: Session
    ) -> Opened | Failure:
        """Attempt until one reaches its first delta, or the policy says stop:
        a failure it does not retry, no attempts left, the circuit opened, or
        the next attempt would start past the deadline."""
        policy = self.policy(model, provider)
        assert policy.attempts is not None and policy.deadline is not None and policy.retry_on is not None
        breaker = self.breaker(provider)
        deadline = time.monotonic() + policy.deadline
        attempt = 1
        while True:
            outcome = await self._attempt(request, call_next, model, provider, breaker)
            if isinstance(outcome, Opened) or outcome.reason not in policy.retry_on:
                return outcome
            if attempt >= policy.attempts or breaker.refuses():
                return outcome
            retry_after = outcome.retry_after
            delay = retry_after if retry_after is not None else policy.backoff(attempt)
            if time.monotonic() + delay >= deadline:
                return outcome
            attempt += 1
            self._announce_retry(session, outcome, attempt, delay)
            await trio.sleep(delay)

    async def _attempt(
        self,
        request: ChatRequest,
        call_next: Callable[[ChatRequest], AsyncIterator[Delta]],
        model: str,
        provider: str,
        breaker: CircuitBreaker,
    ) -> Opened | Failure:
        """One call up to the first visible delta. Returns its outcome; raises only
        what is not an Exception (cancellation), which is never retried."""
        admission = breaker.admit()
        if admission is None:
            wait = max(1, math.ceil(breaker.retry_in()))
            error = CircuitOpen(
                f"Provider '{provider}' is failing and is skipped for now (its circuit is open); retry in {wait} s.",
                headers={"Retry-After": str(wait)},
            )
            return Failure(error, "circuit_open", model, provider)
        stream: AsyncIterator[Delta] | None = None
        outcome: Opened | Failure | None = None
        try:
            try:
                stream = call_next(request)
                head, exhausted = await _read_head(stream)
            except Exception as exc:
                error = unwrap(exc)
                outcome = Failure(error, classify(error), model, provider)
                if outcome.reason in CIRCUIT_FAILURES:
                    breaker.failed()
                elif admission == "probe":
                    breaker.abandoned()  # a refused request says nothing of the upstream
                return outcome
            breaker.succeeded()
            outcome = Opened(stream, head, exhausted, model, provider)
            return outcome
        finally:
            if outcome is None and admission == "probe":
                breaker.abandoned()  # cancelled: the next request probes instead
            if not isinstance(outcome, Opened):
                await _aclose(stream)

    # -- events and metrics -----------------------------------------------------------

    def _announce_retry(self, session: Session, failure: Failure, attempt: int, delay: float) -> None:
        delay = round(delay, 3)
        data = failure.event_data()
        self.retries.labels(failure.reason, failure.provider).inc()
        log.info(
            "retrying %s on %s (attempt %d) in %.3f s after %s: %s",
            failure.model, failure.provider, attempt, delay, failure.reason, data["error"],
        )
        session.emit("retry", attempt=attempt, delay=delay, model=failure.model, provider=failure.provider, **data)

    def _announce_fallback(self, session: Session, failure: Failure, to_model: str, to_provider: str) -> None:
        self.fallbacks.labels(failure.reason).inc()
        log.info("falling back from %s to %s after %s", failure.model, to_model, failure.reason)
        session.emit(
            "fallback",
            from_model=failure.model,
            from_provider=failure.provider,
            to_model=to_model,
            to_provider=to_provider,
            **failure.event_data(),
        )
