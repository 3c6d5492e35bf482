"""The `keys` plugin: API keys, rate limits, budgets and spend.

- **Who asks.** An authenticator (`register_authenticators`) turns the
  `Authorization: Bearer sk-sv-…` of every `/v1` request into a `Principal`:
  the key's owner identity, its team and role. Keys live in the store (its
  `RecordStore` methods), found by the SHA-256 of the secret; the secret itself
  is never stored. A small cache keeps the lookup off the database; with Redis,
  a version per key makes a revocation reach every instance on its next request.
- **May it.** A gate (`register_gates`) checks the model against the key's and
  its team's patterns, then reserves against both scopes' limits at once:
  requests and tokens per minute, concurrent streams, and the budget. Tokens
  and cost are reserved from the prompt estimate plus `max_tokens` (or
  `default_max_tokens`), and settled from the session's real usage at its
  terminal event, whichever way it ended.
- **Spend.** Every key's (and team's) cost, tokens and requests per day, per
  month and in all are added up in the store, written once a second.

Counters are in memory on one instance; with `redis_url` they are in Redis,
shared by every instance (plugins/keys/limits.py).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Any

import attrs
import trio
from prometheus_client import Counter
from quart import request

from streamvisor.hooks import (
    INTERRUPTED,
    TERMINAL_TYPES,
    Admission,
    APIError,
    ChatRequest,
    ConfigError,
    Event,
    Health,
    InvalidRequest,
    NotFound,
    Principal,
    RecordStore,
    SessionQuery,
    Usage,
    bearer_token,
    hookimpl,
    json_response,
    listens_to,
    positive,
    read_json,
    require_admin,
)

from .limits import Decision, MemoryLimiter, RedisLimiter, Scope, Settlement, Window, budget_ttl
from .records import (
    KEY_FIELDS,
    KEY_KIND,
    SECRET_PREFIX,
    SPEND_KIND,
    TEAM_FIELDS,
    TEAM_KIND,
    Key,
    Team,
    checked,
    new_key_id,
    new_secret,
    period_end,
    period_label,
    secret_hash,
)

log = logging.getLogger("streamvisor.plugins.keys")

CHAT_PATH = "/v1/chat/completions"
#: An amount per interrupted session: adding 1 to it claims the session's charge,
#: so that it is charged once, whichever instance finds it first.
CHARGED_KIND = "keys:charged"
#: How far back interrupted sessions are looked for.
INTERRUPTED_DAYS = 2
#: What the spend tables add up, per scope and period.
AMOUNTS = (("cost_usd", SPEND_KIND), ("tokens", "keys:tokens"), ("requests", "keys:requests"))
#: How long an unknown secret's miss is remembered (a flood of bad keys costs
#: the database one read per secret per this many seconds).
NEGATIVE_SECONDS = 1.0
MAX_LISTED = 1000


def _on_redis_error(instance: Any, attribute: Any, value: str) -> None:
    if value not in ("open", "closed"):
        raise ValueError(f"on_redis_error must be 'open' (admit without limits) or 'closed' (refuse), got {value!r}")


@attrs.frozen
class Settings:
    #: Redis for limits shared by several instances ("" keeps them in memory).
    redis_url: str = ""
    key_prefix: str = "streamvisor:keys:"
    #: When Redis cannot answer: "closed" refuses requests of keys with limits
    #: (503), "open" lets them through unlimited. Readiness says which.
    on_redis_error: str = attrs.field(default="closed", validator=_on_redis_error)
    #: The bound on connecting to Redis and on each script.
    redis_timeout: float = attrs.field(default=0.5, validator=positive)
    #: Tokens reserved for the answer of a request that sets no max_tokens.
    default_max_tokens: int = attrs.field(default=4096, validator=positive)
    #: How long a key read from the store is trusted before it is read again
    #: (with Redis, a changed key is noticed on its next request anyway).
    cache_seconds: float = attrs.field(default=5.0, validator=positive)
    max_cached_keys: int = attrs.field(default=10_000, validator=positive)
    #: A concurrent stream's lease in Redis lasts this long unless renewed
    #: (the owning instance renews it every third of it).
    lease_seconds: float = attrs.field(default=30.0, validator=positive)
    #: How often spend is added to the store.
    flush_seconds: float = attrs.field(default=1.0, validator=positive)
    #: How often the store is searched for interrupted sessions (their server
    #: died mid-stream) to charge to their keys.
    interrupted_scan_seconds: float = attrs.field(default=60.0, validator=positive)


@attrs.define
class _Cached:
    key: Key | None
    at: float
    version: str = ""


@attrs.frozen
class _Pending:
    """A session a gate admitted, until its terminal event settles it."""

    key_id: str
    team: str | None
    scopes: list[Scope]
    bucket: int
    tokens: int
    #: Whether the limiter counted it (not when Redis was down and the plugin open).
    counted: bool


@attrs.frozen
class _Metrics:
    refused: Counter
    redis_errors: Counter
    settled: Counter


def reset_text(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it: "20ms", "6s", "1m0s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, window in (("requests", decision.requests), ("tokens", decision.tokens)):
        if window is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = reset_text(window.reset)
    return headers


def invalid_key(message: str) -> APIError:
    return APIError(message, status=401, type="invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="seconds")


class KeysPlugin:
    Settings = Settings
    streamvisor_contract = "1.5"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Any = None
        self.store: Any = None
        self.limiter: MemoryLimiter | RedisLimiter = (
            RedisLimiter(settings.redis_url, settings.key_prefix, settings.lease_seconds, settings.redis_timeout) if settings.redis_url else MemoryLimiter()
        )
        self._flush_lock = trio.Lock()
        #: Redis: the sessions that ended, settled together by the `settler`.
        self._to_settle: list[Settlement] = []
        self._settle_wake = trio.Event()
        self._cache: dict[str, _Cached] = {}
        #: (scope id, period) -> (budget, its period, identity, key id, team) of
        #: spend counted and not yet added to the store (bounded).
        self._budgets: dict[tuple[str, str], tuple[float, str | None, str, str, str | None]] = {}
        self._teams: dict[str, tuple[Team | None, float]] = {}
        self._pending: dict[str, _Pending] = {}
        #: (kind, scope, period) -> amount not yet added to the store.
        self._unflushed: dict[tuple[str, str, str], float] = {}
        #: (scope, period) -> (spent in the store, when read)
        self._floors: dict[tuple[str, str], tuple[float, float]] = {}
        self._redis_down_since: float | None = None
        self._redis_error = ""
        #: Spend the store would not take at shutdown (the panel shows it).
        self.unflushed_lost = 0.0
        #: Interrupted sessions this process has seen charged.
        self._charged: set[str] = set()
        self.metrics: _Metrics | None = None

    # -- hooks ---------------------------------------------------------------------------

    @hookimpl
    def register_authenticators(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        store = runtime.store
        if store is None or not isinstance(store, RecordStore):
            raise ConfigError(
                runtime.config.source,
                "plugins.keys",
                "a store that keeps records (enable the store plugin: [plugins.store])",
                "no store" if store is None else f"the store {type(store).__name__} has no records",
            )
        self.store = store
        registry = runtime.metrics
        self.metrics = _Metrics(
            refused=Counter("streamvisor_keys_refused", "Requests the keys plugin refused, by reason.", ["reason"], registry=registry),
            redis_errors=Counter("streamvisor_keys_redis_errors", "Redis calls of the keys plugin that failed, by operation.", ["operation"], registry=registry),
            settled=Counter("streamvisor_keys_settled", "Sessions whose reservation was settled from their usage, by outcome.", ["outcome"], registry=registry),
        )
        register(self.authenticate)

    @hookimpl
    def register_gates(self, register: Any) -> None:
        register(self.gate)

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        # The first hook that sees the runtime (routes come before services).
        self._share_redis(runtime.config.server.redis_url)
        register("/admin/keys", require_admin(self.create_view), methods=("POST",), openapi=_op("Create an API key; the secret is in this answer only", 201))
        register("/admin/keys", require_admin(self.list_view), openapi=_op("List API keys"))
        register("/admin/keys/<key_id>", require_admin(self.show_view), openapi=_op("An API key with its spend and usage"))
        register("/admin/keys/<key_id>", require_admin(self.update_view), methods=("PATCH",), openapi=_op("Change an API key's name, models, limits or budget"))
        register("/admin/keys/<key_id>", require_admin(self.revoke_view), methods=("DELETE",), openapi=_op("Revoke an API key"))
        register("/admin/keys/<key_id>/rotate", require_admin(self.rotate_view), methods=("POST",), openapi=_op("Give an API key a new secret; the old one stops working"))
        register("/admin/teams", require_admin(self.teams_view), openapi=_op("List teams"))
        register("/admin/teams/<name>", require_admin(self.team_view), openapi=_op("A team with its limits and spend"))
        register("/admin/teams/<name>", require_admin(self.put_team_view), methods=("PUT",), openapi=_op("Create or change a team's models, limits and budget"))

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("spend", self.run_spend)
        register("interrupted", self.run_interrupted)
        if isinstance(self.limiter, RedisLimiter):
            register("settler", self.run_settler)
            register("leases", self.run_leases)
        else:
            register("windows", self.run_trim)

    @hookimpl
    def register_event_types(self, register: Any) -> None:
        register(
            "key.budget_exceeded",
            "a key's or a team's spend passed its budget for the period; no session "
            "(data: scope, key_id, team, identity, budget_usd, spent_usd, budget_period, period)",
        )

    @hookimpl
    def register_health_checks(self, register: Any) -> None:
        if isinstance(self.limiter, RedisLimiter):
            register("limits", self.check)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("limits", self.panel)

    @hookimpl
    @listens_to(*sorted(TERMINAL_TYPES))
    def on_event(self, event: Event) -> None:
        self.settle(event)

    @hookimpl
    async def shutdown(self) -> None:
        if isinstance(self.limiter, RedisLimiter):
            # The terminal events were delivered before this hook: settle the
            # last sessions now (the settler is cancelled after it).
            await self.settle_queued()
            await self.limiter.client.aclose()
        if not await self.flush():
            self.unflushed_lost += sum(v for (kind, _, period), v in self._unflushed.items() if kind == SPEND_KIND and period == "")
            log.error("keys: spend of %d counters could not be written to the store at shutdown", len(self._unflushed))

    # -- who asks ------------------------------------------------------------------------

    async def authenticate(self, headers: Any, path: str) -> Principal | None:
        token = bearer_token(headers)
        if token is None or not token.startswith(SECRET_PREFIX):
            return None  # another authenticator's, or none: core answers 401
        digest = secret_hash(token)
        cached = await self._lookup(digest)
        if cached.key is not None and path != CHAT_PATH and isinstance(self.limiter, RedisLimiter):
            # The gate checks the version of chat requests in its script;
            # other routes ask Redis here, so a revoked key is refused anywhere.
            version = await self._redis(self.limiter.version(cached.key.id), "version", default=cached.version, optional=True)
            if version != cached.version:
                cached = await self._lookup(digest, fresh=True)
        key = self._usable(cached.key, token)
        team = await self._team(key.team) if key.team else None
        may_use = None
        if key.models or (team is not None and team.models):
            # GET /v1/models lists what the key, and its team, allow.
            may_use = (lambda model: key.allows(model) and team.allows(model)) if team is not None else key.allows
        return Principal(identity=key.identity, team=key.team, role=key.role, key_id=key.id, details=cached, may_use=may_use)

    def _usable(self, key: Key | None, token: str) -> Key:
        if key is None:
            raise invalid_key(f"Incorrect API key provided: {token[:10]}…. Ask your administrator for a key.")
        if key.revoked:
            raise invalid_key(f"The API key {key.shown}… ('{key.name}') has been revoked.")
        if key.expired(time.time()):
            raise invalid_key(f"The API key {key.shown}… ('{key.name}') expired at {_iso(key.expires_at or 0)}.")
        return key

    async def _lookup(self, digest: str, fresh: bool = False) -> _Cached:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if not fresh and cached is not None and now - cached.at < (self.settings.cache_seconds if cached.key else NEGATIVE_SECONDS):
            return cached
        found = await self.store.find_record(KEY_KIND, digest)
        key = None if found is None else Key.of(found[1])
        version = ""
        if key is not None and isinstance(self.limiter, RedisLimiter):
            # Best effort: without it, the version check of the gate reads the
            # key again once Redis answers.
            version = await self._redis(self.limiter.version(key.id), "version", default="", optional=True)
        cached = _Cached(key, now, version)
        if len(self._cache) >= self.settings.max_cached_keys:
            # Bounded: the oldest half goes (dicts keep insertion order).
            for old in list(self._cache)[: len(self._cache) // 2]:
                del self._cache[old]
        self._cache[digest] = cached
        return cached

    async def _team(self, name: str) -> Team | None:
        now = time.monotonic()
        cached = self._teams.get(name)
        if cached is not None and now - cached[1] < self.settings.cache_seconds:
            return cached[0]
        data = await self.store.get_record(TEAM_KIND, name)
        team = None if data is None else Team.of(data)
        if len(self._teams) >= self.settings.max_cached_keys:
            self._teams.clear()
        self._teams[name] = (team, now)
        return team

    # -- may it --------------------------------------------------------------------------

    async def gate(self, request: ChatRequest, principal: Principal) -> Admission | None:
        cached = principal.details
        if not isinstance(cached, _Cached) or cached.key is None:
            return None  # the admin key, or another authenticator's principal
        key = cached.key
        team = await self._team(key.team) if key.team else None
        if not key.allows(request.model) or (team is not None and not team.allows(request.model)):
            self.metrics.refused.labels("model").inc()
            whose = f"key '{key.name}'" if not key.allows(request.model) else f"team '{team.name if team else ''}'"
            raise APIError(
                f"The model '{request.model}' is not allowed for the {whose}.",
                status=403,
                type="invalid_request_error",
                code="model_not_allowed",
                param="model",
            )
        prompt = request.estimate_prompt_tokens()
        answer = request.max_tokens or self.settings.default_max_tokens
        tokens = prompt + answer
        decision = None
        for _ in range(2):
            scopes = await self._scopes(cached, team)
            if not scopes:
                break
            # The reserved cost counts only against a budget: priced only then.
            budgeted = any(scope.limits.max_budget_usd is not None for scope in scopes)
            cost = (self.runtime.price(request.model, Usage(prompt, answer, exact=False)) or 0.0) if budgeted else 0.0
            decision = await self._admit(scopes, request.session_id, tokens, cost)
            if decision is None or decision.refusal != "stale":
                break
            # The key changed on another instance (or by the CLI): read it again.
            cached = await self._refetch(cached)
            key = self._usable(cached.key, key.shown)
            team = await self._team(key.team) if key.team else None
        else:
            raise APIError("The key changed while the request was admitted; retry.", status=409, code="key_changed")
        if decision is not None and not decision.ok:
            raise self._refusal(decision, key, team)
        counted = decision is not None
        self._pending[request.session_id] = _Pending(key.id, key.team, scopes if counted else [], decision.bucket if decision else 0, tokens, counted)
        session_id = request.session_id
        return Admission(headers=rate_headers(decision) if decision else {}, release=lambda: self._release(session_id))

    async def _refetch(self, cached: _Cached) -> _Cached:
        assert cached.key is not None
        data = await self.store.get_record(KEY_KIND, cached.key.id)
        # A rotated key has a new hash: the secret this request came with is dead.
        key = None if data is None or data.get("hash") != cached.key.hash else Key.of(data)
        version = await self._redis(self.limiter.version(cached.key.id), "version", default="", optional=True) if key else ""
        fresh = self._cache[cached.key.hash] = _Cached(key, time.monotonic(), version)
        return fresh

    async def _scopes(self, cached: _Cached, team: Team | None) -> list[Scope]:
        assert cached.key is not None
        key = cached.key
        now = time.time()
        scopes = []
        # A version this instance could not read ("?") fails the check: the
        # key is read again rather than trusted unchecked.
        for scope_id, limits, version in ((f"key:{key.id}", key.limits, cached.version or "?"), (f"team:{team.name}" if team else "", team.limits if team else None, "")):
            # The key's scope always goes: with Redis its script checks the
            # key's version, so a revoked key is refused on every instance.
            if limits is None or (scope_id.startswith("team:") and not limits.any):
                continue
            period = period_label(limits.budget_period, now)
            floor = await self._floor(scope_id, period) if limits.max_budget_usd is not None else 0.0
            scopes.append(Scope(scope_id, limits, period, budget_ttl(period_end(limits.budget_period, now), now), floor, version))
        return scopes

    async def _floor(self, scope_id: str, period: str) -> float:
        """What the store says was spent (with what this process has not written
        yet), read at most every cache_seconds: where a lost counter restarts."""
        now = time.monotonic()
        known = self._floors.get((scope_id, period))
        if known is None or now - known[1] >= self.settings.cache_seconds:
            stored = await self.store.amount(SPEND_KIND, scope_id, period)
            known = self._floors[(scope_id, period)] = (stored, now)
        return known[0] + self._unflushed.get((SPEND_KIND, scope_id, period), 0.0)

    async def _admit(self, scopes: list[Scope], session_id: str, tokens: int, cost: float) -> Decision | None:
        """The limiter's decision; None when Redis failed and the plugin is open."""
        if isinstance(self.limiter, RedisLimiter):
            # A key without limits is let through while Redis is down, whatever
            # on_redis_error says: only its version check is missed.
            limited = any(scope.limits.any for scope in scopes)
            return await self._redis(self.limiter.admit(scopes, session_id, tokens, cost), "admit", default=None, optional=not limited)
        return await self.limiter.admit(scopes, session_id, tokens, cost)

    def _refusal(self, decision: Decision, key: Key, team: Team | None) -> APIError:
        who = f"key '{key.name or key.id}'" if decision.scope == f"key:{key.id}" else f"team '{team.name if team else ''}'"
        limits = key.limits if decision.scope == f"key:{key.id}" else (team.limits if team else key.limits)
        reason = decision.refusal or "requests"
        self.metrics.refused.labels(reason).inc()
        retry = max(1, math.ceil(decision.retry_after))
        if reason == "budget":
            budget = limits.max_budget_usd or 0.0
            end = period_end(limits.budget_period, time.time())
            when = f" It resets at {_iso(end)}." if end else ""
            headers = {"Retry-After": str(max(1, math.ceil(end - time.time())))} if end else {}
            return APIError(
                f"The {who} has spent its budget: ${decision.spent:.6f} spent and ${decision.reserved:.6f} reserved by streams "
                f"still running, of ${budget:g}{' this ' + limits.budget_period if limits.budget_period else ''}.{when}",
                status=429,
                type="insufficient_quota",
                code="insufficient_quota",
                headers=headers,
            )
        headers = {"Retry-After": str(retry)}
        if reason in ("requests", "tokens"):
            limit = limits.rpm_limit if reason == "requests" else limits.tpm_limit
            headers.update(rate_headers(Decision(True, **{reason: Window(limit or 0, 0, decision.retry_after)})))
        what = {
            "requests": f"requests per minute (RPM): limit {limits.rpm_limit}",
            "tokens": f"tokens per minute (TPM): limit {limits.tpm_limit}",
            "concurrency": f"concurrent streams: limit {limits.max_concurrent_streams}",
        }[reason]
        return APIError(
            f"Rate limit reached for the {who} on {what}. Please try again in {retry}s.",
            status=429,
            type="tokens" if reason == "tokens" else "requests",
            code="rate_limit_exceeded",
            headers=headers,
        )

    def _release(self, session_id: str) -> None:
        pending = self._pending.pop(session_id, None)
        if pending is not None and pending.counted:
            self._settle_limits(pending, session_id, 0, 0.0)

    # -- settling ------------------------------------------------------------------------

    def settle(self, event: Event) -> None:
        pending = self._pending.pop(event.session_id, None)
        if pending is None:
            return
        usage = event.outcome.usage if event.outcome is not None else Usage(exact=False)
        cost = usage.cost_usd or 0.0
        self.metrics.settled.labels(event.type).inc()
        if pending.counted:
            self._settle_limits(pending, event.session_id, usage.total_tokens, cost)
        scope_ids = [f"key:{pending.key_id}"] + ([f"team:{pending.team}"] if pending.team else [])
        self._add_spend(scope_ids, time.time(), cost, usage.total_tokens)
        if cost > 0:
            for scope in pending.scopes:
                if scope.limits.max_budget_usd is not None and len(self._budgets) < 100_000:
                    # What `flush` compares the stored spend with, once it is added.
                    self._budgets[(scope.id, scope.period)] = (scope.limits.max_budget_usd, scope.limits.budget_period, event.identity, pending.key_id, pending.team)

    def _add_spend(self, scope_ids: list[str], at: float, cost: float, tokens: int) -> None:
        """Count a session's cost, tokens and request for the store's spend
        tables (written by the `spend` service)."""
        periods = ("", period_label("day", at), period_label("month", at))
        for scope_id in scope_ids:
            for period in periods:
                for name, kind in AMOUNTS:
                    amount = cost if name == "cost_usd" else tokens if name == "tokens" else 1
                    slot = (kind, scope_id, period)
                    self._unflushed[slot] = self._unflushed.get(slot, 0.0) + amount

    def _settle_limits(self, pending: _Pending, session_id: str, tokens: int, cost: float) -> None:
        if isinstance(self.limiter, RedisLimiter):
            self._to_settle.append(Settlement(session_id, pending.scopes, pending.bucket, pending.tokens, tokens, cost))
            self._settle_wake.set()
        else:
            self.limiter.settle(pending.scopes, session_id, pending.bucket, pending.tokens, tokens, cost)

    async def settle_queued(self) -> None:
        """Settle every session that ended since the last call, in script
        calls of up to 500 sessions each."""
        assert isinstance(self.limiter, RedisLimiter)
        batch, self._to_settle = self._to_settle, []
        for start in range(0, len(batch), 500):
            await self._redis(self.limiter.settle_many(batch[start : start + 500]), "settle", default=None, optional=True)

    async def run_settler(self) -> None:
        """Redis: settle the sessions that ended, together. One round trip per
        session fell behind at concurrency 32, and a session not yet settled
        still holds its lease (a false 429 for the next request)."""
        while True:
            await self._settle_wake.wait()
            self._settle_wake = trio.Event()
            await self.settle_queued()

    async def flush(self) -> bool:
        """Add the spend counted since the last flush to the store. One flush
        at a time: the shutdown's waits for the service's to finish."""
        async with self._flush_lock:
            if not self._unflushed:
                return True
            batch, self._unflushed = self._unflushed, {}
            try:
                for slot in list(batch):
                    kind, scope_id, period = slot
                    total = await self.store.add_amount(kind, scope_id, period, batch[slot])
                    added = batch.pop(slot)
                    if kind == SPEND_KIND:
                        self._floors.pop((scope_id, period), None)
                        self._crossed(scope_id, period, total, added)
            except BaseException as exc:
                # What was not written goes back, failed or cancelled alike.
                for slot, amount in batch.items():
                    self._unflushed[slot] = self._unflushed.get(slot, 0.0) + amount
                if not isinstance(exc, Exception):
                    raise
                log.warning("keys: adding spend to the store failed (%s); it is kept and retried", exc)
                return False
            return True

    def _crossed(self, scope_id: str, period: str, total: float, added: float) -> None:
        """Emit `key.budget_exceeded` when this addition took a scope's stored
        spend past its budget. The store's addition is atomic, so among all the
        instances exactly one sees the total cross the line."""
        budget = self._budgets.pop((scope_id, period), None)
        if budget is None:
            return
        limit, budget_period, identity, key_id, team = budget
        if total >= limit > total - added:
            scope, _, name = scope_id.partition(":")
            self.runtime.emit(
                "key.budget_exceeded",
                scope=scope,
                key_id=name if scope == "key" else key_id,
                team=name if scope == "team" else team,
                identity=identity if scope == "key" else None,
                budget_usd=limit,
                spent_usd=round(total, 9),
                budget_period=budget_period,
                period=period,
            )

    async def charge_interrupted(self) -> int:
        """Charge the sessions the store marked interrupted (their server died
        while they streamed, so no terminal event settled them) to their keys:
        what they had produced, at the price table's rates. Each is claimed
        with an atomic amount first, so it is charged once. Returns how many
        this call charged."""
        charged = 0
        query = SessionQuery(state=INTERRUPTED, since=time.time() - INTERRUPTED_DAYS * 86400, limit=100)
        for _ in range(100):
            page = await self.store.sessions(query)
            for stored in page:
                if stored.key_id is None or stored.id in self._charged:
                    continue
                self._charged.add(stored.id)
                if await self.store.add_amount(CHARGED_KIND, stored.id, "", 1) != 1:
                    continue  # charged already (by this or another instance)
                usage = stored.usage or Usage(exact=False)
                cost = usage.cost_usd if usage.cost_usd is not None else (self.runtime.price(stored.model, usage) or 0.0)
                scopes = [f"key:{stored.key_id}"] + ([f"team:{stored.team}"] if stored.team else [])
                self._add_spend(scopes, stored.created_at, cost, usage.total_tokens)
                for scope_id in scopes:
                    await self._redis_charge(scope_id, stored.created_at, cost)
                charged += 1
            if len(page) < query.limit:
                break
            query = attrs.evolve(query, after=(page[-1].created_at, page[-1].id))
        if len(self._charged) > 100_000:
            self._charged.clear()  # bounded; the claims in the store still hold
        if charged:
            log.warning("keys: charged %d interrupted sessions to their keys", charged)
        return charged

    async def _redis_charge(self, scope_id: str, at: float, cost: float) -> None:
        """A charge outside a settlement: into the live budget counters too."""
        for period in (period_label("day", at), period_label("month", at), ""):
            if isinstance(self.limiter, RedisLimiter):
                await self._redis(self.limiter.charge(scope_id, period, cost), "charge", default=None, optional=True)
            else:
                self.limiter.charge(scope_id, period, cost)

    async def run_interrupted(self) -> None:
        await trio.sleep(min(5.0, self.settings.interrupted_scan_seconds))
        while True:
            try:
                await self.charge_interrupted()
            except APIError as exc:  # the store cannot answer now: the next scan
                log.warning("keys: searching for interrupted sessions failed: %s", exc.message)
            await trio.sleep(self.settings.interrupted_scan_seconds)

    async def run_spend(self) -> None:
        while True:
            await trio.sleep(self.settings.flush_seconds)
            await self.flush()

    async def run_trim(self) -> None:
        while True:
            await trio.sleep(10)
            self.limiter.trim()

    async def run_leases(self) -> None:
        """Renew the Redis leases of this instance's live sessions."""
        assert isinstance(self.limiter, RedisLimiter)
        while True:
            await trio.sleep(self.settings.lease_seconds / 3)
            leases: dict[str, list[str]] = {}
            for session_id, pending in self._pending.items():
                for scope in pending.scopes:
                    if pending.counted and (scope.limits.max_concurrent_streams is not None or scope.limits.max_budget_usd is not None):
                        leases.setdefault(scope.id, []).append(session_id)
            if leases:
                await self._redis(self.limiter.renew(leases, self.settings.lease_seconds), "renew", default=None, optional=True)

    # -- Redis ---------------------------------------------------------------------------

    async def _redis(self, call: Any, operation: str, *, default: Any, optional: bool = False) -> Any:
        """Run a Redis call under the timeout. A failure counts; then an
        `optional` call (settling, renewing, a version check) gives `default`
        (leases expire by themselves; the key cache still holds), and one that
        admits a request is let through (`open`) or refused (`closed`)."""
        try:
            with trio.fail_after(self.settings.redis_timeout * 4):
                result = await call
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.redis_errors.labels(operation).inc()
            if self._redis_down_since is None:
                self._redis_down_since = time.time()
                log.error("keys: Redis failed (%s: %s); on_redis_error = %s", type(exc).__name__, exc, self.settings.on_redis_error)
            self._redis_error = f"{type(exc).__name__}: {exc}"
            if optional or self.settings.on_redis_error == "open":
                return default
            raise APIError(
                "Rate limits cannot be checked right now (their store is unavailable); retry shortly.",
                status=503,
                type="server_error",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        if self._redis_down_since is not None:
            log.warning("keys: Redis answers again")
            self._redis_down_since = None
        return result

    async def check(self) -> Health:
        assert isinstance(self.limiter, RedisLimiter)
        try:
            with trio.fail_after(self.settings.redis_timeout * 4):
                await self.limiter.ping()
        except Exception as exc:
            detail = {"redis": f"unavailable: {type(exc).__name__}: {exc}", "on_redis_error": self.settings.on_redis_error}
            if self.settings.on_redis_error == "open":
                detail["limits"] = "not enforced while Redis is down"
                return Health(True, detail)
            detail["limits"] = "requests of keys with limits are refused (503) while Redis is down"
            return Health(False, detail)
        return Health(True, {"redis": "ok", "on_redis_error": self.settings.on_redis_error})

    def _share_redis(self, shared: str) -> None:
        """Without a redis_url of its own, the deployment's shared one (`[server]
        redis_url`) holds the limits."""
        if not self.settings.redis_url and shared and not isinstance(self.limiter, RedisLimiter):
            self.limiter = RedisLimiter(shared, self.settings.key_prefix, self.settings.lease_seconds, self.settings.redis_timeout)

    async def keys_command(self, argv: list[str], store: Any, config: Any = None) -> int:
        """`streamvisor keys ...` (the CLI): the admin API's operations against
        the store, outside any server. With Redis (the plugin's `redis_url`, or
        `[server] redis_url` of `config`), a change is announced there too, so
        running servers notice it on the key's next request."""
        self._share_redis(getattr(getattr(config, "server", None), "redis_url", ""))
        try:
            return await _keys_command(self, argv, store)
        finally:
            if isinstance(self.limiter, RedisLimiter):
                await self.limiter.client.aclose()

    def panel(self) -> dict[str, Any]:
        return {
            "limiter": self.limiter.name,
            "on_redis_error": self.settings.on_redis_error,
            "redis_down_since": self._redis_down_since,
            "last_redis_error": self._redis_error or None,
            "cached_keys": len(self._cache),
            "admitted_live": len(self._pending),
            "unflushed_counters": len(self._unflushed),
            "spend_lost_usd": self.unflushed_lost,
        }

    # -- the admin API -------------------------------------------------------------------

    async def _bump(self, key: Key) -> None:
        """A key changed: forget it here, and tell the other instances."""
        for digest in [d for d, c in self._cache.items() if c.key is not None and c.key.id == key.id]:
            del self._cache[digest]
        if isinstance(self.limiter, RedisLimiter):
            await self._redis(self.limiter.bump(key.id), "bump", default=None, optional=True)

    async def key_record(self, key_id: str) -> dict[str, Any]:
        data = await self.store.get_record(KEY_KIND, key_id) if key_id.startswith("key_") else None
        if data is None:
            raise NotFound(f"No API key with id '{key_id}'.")
        return data

    async def create_key(self, fields: dict[str, Any]) -> tuple[Key, str]:
        if fields.get("role") == "team_admin" and not fields.get("team"):
            raise InvalidRequest("a key with role 'team_admin' needs a 'team'", param="role")
        secret, now = new_secret(), time.time()
        data = {
            "id": new_key_id(),
            "name": "",
            "team": None,
            "role": "member",
            "models": [],
            "metadata": {},
            **fields,
            "revoked": False,
            "created_at": now,
            "updated_at": now,
            "shown": secret[:10],
            "hash": secret_hash(secret),
        }
        data["name"] = data["name"] or data["id"]
        await self.store.put_record(KEY_KIND, data["id"], data, lookup=data["hash"])
        return Key.of(data), secret

    async def update_key(self, key_id: str, fields: dict[str, Any]) -> Key:
        data = await self.key_record(key_id)
        merged = {**data, **fields, "updated_at": time.time()}
        if merged.get("role") == "team_admin" and not merged.get("team"):
            raise InvalidRequest("a key with role 'team_admin' needs a 'team'", param="role")
        await self.store.put_record(KEY_KIND, key_id, merged, lookup=merged["hash"])
        key = Key.of(merged)
        await self._bump(key)
        return key

    async def revoke_key(self, key_id: str) -> Key:
        data = await self.key_record(key_id)
        if data.get("revoked"):
            return Key.of(data)
        now = time.time()
        return await self.update_key(key_id, {"revoked": True, "revoked_at": now})

    async def rotate_key(self, key_id: str) -> tuple[Key, str]:
        data = await self.key_record(key_id)
        if data.get("revoked"):
            raise APIError(f"The API key '{key_id}' is revoked: create a new one.", status=409, code="key_revoked")
        secret = new_secret()
        key = await self.update_key(key_id, {"hash": secret_hash(secret), "shown": secret[:10], "rotated_at": time.time()})
        return key, secret

    async def spend(self, scope_id: str, limits: Any) -> dict[str, Any]:
        now = time.time()
        periods = {"total": "", "today": period_label("day", now), "this_month": period_label("month", now)}
        out: dict[str, Any] = {}
        for name, kind in AMOUNTS:
            values = {}
            for label, period in periods.items():
                value = await self.store.amount(kind, scope_id, period) + self._unflushed.get((kind, scope_id, period), 0.0)
                values[label] = round(value, 9) if name == "cost_usd" else int(value)
            out[name] = values
        budget = None
        if limits.max_budget_usd is not None:
            period = period_label(limits.budget_period, now)
            spent = await self.store.amount(SPEND_KIND, scope_id, period) + self._unflushed.get((SPEND_KIND, scope_id, period), 0.0)
            end = period_end(limits.budget_period, now)
            budget = {
                "max_budget_usd": limits.max_budget_usd,
                "budget_period": limits.budget_period,
                "spent_usd": round(spent, 9),
                "remaining_usd": round(max(0.0, limits.max_budget_usd - spent), 9),
                "resets_at": end,
            }
        return {"spend": out, "budget": budget}

    async def list_keys(self, identity: str | None, team: str | None, revoked: bool | None, limit: int, after: str | None) -> tuple[list[Key], str | None]:
        found: list[Key] = []
        cursor = after
        for _ in range(100):
            page = await self.store.list_records(KEY_KIND, 500, cursor)
            for record_id, data in page:
                cursor = record_id
                key = Key.of(data)
                if (identity is None or key.identity == identity) and (team is None or key.team == team) and (revoked is None or key.revoked == revoked):
                    found.append(key)
                    if len(found) == limit:
                        return found, record_id
            if len(page) < 500:
                break
        return found, None

    async def create_view(self) -> Any:
        key, secret = await self.create_key(checked(await read_json(), KEY_FIELDS, partial=False))
        return json_response({**key.to_json(), "secret": secret}, 201, headers={"Location": f"/admin/keys/{key.id}"})

    async def list_view(self) -> Any:
        args = request.args
        known = {"identity", "team", "revoked", "limit", "after"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise InvalidRequest(f"unknown query parameter '{unknown[0]}'; the filters are: {', '.join(sorted(known))}", param=unknown[0])
        revoked = args.get("revoked")
        if revoked not in (None, "true", "false"):
            raise InvalidRequest("'revoked' must be true or false", param="revoked")
        raw = args.get("limit", "100")
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LISTED:
            raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LISTED}, got '{raw[:40]}'", param="limit")
        keys, cursor = await self.list_keys(args.get("identity"), args.get("team"), None if revoked is None else revoked == "true", int(raw), args.get("after"))
        return json_response({"object": "list", "data": [k.to_json() for k in keys], "has_more": cursor is not None, "next_cursor": cursor})

    async def show_view(self, key_id: str) -> Any:
        key = Key.of(await self.key_record(key_id))
        body = key.to_json()
        body.update(await self.spend(f"key:{key.id}", key.limits))
        return json_response(body)

    async def update_view(self, key_id: str) -> Any:
        key = await self.update_key(key_id, checked(await read_json(), KEY_FIELDS, partial=True))
        return json_response(key.to_json())

    async def revoke_view(self, key_id: str) -> Any:
        return json_response((await self.revoke_key(key_id)).to_json())

    async def rotate_view(self, key_id: str) -> Any:
        key, secret = await self.rotate_key(key_id)
        return json_response({**key.to_json(), "secret": secret})

    async def teams_view(self) -> Any:
        teams = [Team.of(data).to_json() for _, data in await self.store.list_records(TEAM_KIND, MAX_LISTED)]
        return json_response({"object": "list", "data": teams})

    async def team_view(self, name: str) -> Any:
        data = await self.store.get_record(TEAM_KIND, name)
        if data is None:
            raise NotFound(f"No team named '{name}'.")
        team = Team.of(data)
        return json_response({**team.to_json(), **await self.spend(f"team:{name}", team.limits)})

    async def put_team_view(self, name: str) -> Any:
        checked({"team": name}, ("team",), partial=True)  # the name's rules
        fields = checked(await read_json(), TEAM_FIELDS, partial=True)
        data = await self.store.get_record(TEAM_KIND, name)
        created = data is None
        data = {"name": name, "models": [], "metadata": {}, "created_at": time.time(), **(data or {}), **fields, "updated_at": time.time()}
        await self.store.put_record(TEAM_KIND, name, data)
        self._teams.pop(name, None)
        return json_response(Team.of(data).to_json(), 201 if created else 200)


# -- streamvisor keys ---------------------------------------------------------------------


def _cli_parser() -> Any:
    import argparse

    top = argparse.ArgumentParser(prog="streamvisor keys", description="API keys in the store.")
    actions = top.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("--identity", required=True, help="who owns the key (their sessions and usage are theirs)")
    create.add_argument("--name")
    create.add_argument("--team")
    create.add_argument("--role", choices=("member", "team_admin"))
    create.add_argument("--models", help="comma-separated model names or patterns it may use (default: every model)")
    create.add_argument("--rpm", type=int, dest="rpm_limit")
    create.add_argument("--tpm", type=int, dest="tpm_limit")
    create.add_argument("--concurrency", type=int, dest="max_concurrent_streams")
    create.add_argument("--budget", type=float, dest="max_budget_usd", help="US dollars")
    create.add_argument("--period", choices=("day", "month"), dest="budget_period", help="the budget resets every day or month")
    create.add_argument("--expires-in-days", type=float)
    listing = actions.add_parser("list", help="list keys")
    listing.add_argument("--identity")
    listing.add_argument("--team")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    for name, text in (("show", "a key with its spend"), ("revoke", "revoke a key"), ("rotate", "give a key a new secret (printed once)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("key_id")
    return top


async def _keys_command(plugin: KeysPlugin, argv: list[str], store: Any) -> int:
    import json
    import sys

    args = _cli_parser().parse_args(argv)
    plugin.store = store

    def show(body: Any) -> None:
        print(json.dumps(body, indent=2, default=str))

    try:
        if args.action == "create":
            fields = {name: getattr(args, name) for name in ("identity", "name", "team", "role", "rpm_limit", "tpm_limit", "max_concurrent_streams", "max_budget_usd", "budget_period") if getattr(args, name) is not None}
            if args.models:
                fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
            if args.expires_in_days is not None:
                fields["expires_at"] = time.time() + args.expires_in_days * 86400
            key, secret = await plugin.create_key(checked(fields, KEY_FIELDS, partial=False))
            show(key.to_json())
            print(f"\nsecret (shown once; keep it now): {secret}")
        elif args.action == "list":
            keys, _ = await plugin.list_keys(args.identity, args.team, None if args.all else False, MAX_LISTED, None)
            for key in keys:
                state = "revoked" if key.revoked else "expired" if key.expired(time.time()) else "active"
                print(f"{key.id}  {key.shown}…  {state:8}  {key.identity:20}  {key.team or '-':12}  {key.name}")
            if not keys:
                print("no keys")
        elif args.action == "show":
            key = Key.of(await plugin.key_record(args.key_id))
            show({**key.to_json(), **await plugin.spend(f"key:{key.id}", key.limits)})
        elif args.action == "revoke":
            show((await plugin.revoke_key(args.key_id)).to_json())
        elif args.action == "rotate":
            key, secret = await plugin.rotate_key(args.key_id)
            show(key.to_json())
            print(f"\nnew secret (shown once; the old one no longer works): {secret}")
    except APIError as exc:
        print(f"streamvisor keys: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _op(summary: str, status: int = 200) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": "Needs the admin key (docs/plugins/keys.md).",
        "responses": {
            str(status): {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": {"description": "A bad field (`param` names it).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "401": {"description": "No admin key, or a wrong one.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "404": {"description": "No such key or team.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }
