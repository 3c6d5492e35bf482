"""The `usage` plugin: the usage ledger and `GET /v1/usage`.

Every session's terminal event (completed, failed, stopped, disconnected)
carries the session's `Usage`, and becomes a `UsageRecord`: prompt, completion,
reasoning and total tokens, what it cost (when a plugin prices sessions),
processing time, and whether the counts are exact.
Terminal events are never dropped, so the ledger sees every session. Records are
kept individually for `retention_seconds` (and at most `max_records` of them),
then *folded* into per-time-bucket tallies keyed by (model, provider, identity, team);
past `max_buckets` buckets, the oldest bucket folds into time-less all-time
tallies. Folding never changes a total, only the time resolution. It happens
eagerly when a record arrives (the count bound) and in the `ledger` service actor
(the retention clock), so memory is released even when traffic stops.

The all-time totals are this plugin's status panel (`usage:totals`), which the
admin plugin shows with every other panel. The routes answer each caller for
what it may see (`current_principal()`): a member its own usage, a team admin
its team's, the admin (and everyone, when nothing authenticates) all of it.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import time
from typing import Any, Iterable

import attrs
import trio
from prometheus_client import Counter, Gauge
from quart import request

from streamvisor.hooks import TERMINAL_TYPES, Event, InvalidRequest, Principal, current_principal, hookimpl, json_response, listens_to

log = logging.getLogger("streamvisor.usage")

#: The outcomes a record can have: the terminal event types.
OUTCOMES = ("completed", "failed", "stopped", "disconnected")
assert set(OUTCOMES) == TERMINAL_TYPES
#: `GET /v1/usage/sessions` lists at most this many records.
MAX_LISTED = 1000
DEFAULT_LISTED = 100
#: Longest filter value accepted (model, provider, identity and team names).
MAX_FILTER_CHARS = 256
FILTERS = ("model", "provider", "identity", "team", "since", "until")
#: Decimal places of a summed cost in JSON: a billionth of a dollar, finer than
#: any price per token, and no float noise (0.30000000000000004).
COST_DECIMALS = 9


def _ge(bound: float):
    return attrs.validators.ge(bound)


@attrs.frozen
class Settings:
    #: How long a finished session's record is kept individually (exact times).
    retention_seconds: float = attrs.field(default=300.0, validator=_ge(0))
    #: At most this many individual records; past it the oldest fold early.
    max_records: int = attrs.field(default=10_000, validator=_ge(1))
    #: The time resolution of folded records.
    bucket_seconds: int = attrs.field(default=60, validator=_ge(1))
    #: At most this many time buckets (10080 minutes: a week); past it the oldest
    #: bucket folds into the all-time tallies, which have no time.
    max_buckets: int = attrs.field(default=10_080, validator=_ge(1))


# -- records and tallies ----------------------------------------------------------

Key = tuple[str, str, str, str | None, str | None]  # (model, provider, identity, team, key_id)


@attrs.frozen(slots=True)
class UsageRecord:
    """One finished session's usage."""

    session_id: str
    request_id: str
    model: str
    provider: str
    identity: str
    #: The terminal event type: completed, failed, stopped or disconnected.
    outcome: str
    #: Wall-clock time the session finished (seconds since the epoch).
    finished_at: float
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    #: Processing time: from the session's creation to its end.
    duration_ms: float
    first_token_ms: float | None
    #: False when the counts were estimated (the provider gave none).
    exact: bool
    #: The caller's team, when its key belongs to one.
    team: str | None = None
    #: What it cost in US dollars; None when no plugin priced the model.
    cost_usd: float | None = None
    #: Prompt tokens the provider served from its prompt cache.
    cached_tokens: int = 0
    #: The API key the session was made with, or None.
    key_id: str | None = None

    @property
    def key(self) -> Key:
        return (self.model, self.provider, self.identity, self.team, self.key_id)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_event(cls, event: Event) -> "UsageRecord":
        """The record of a terminal event (which carries the session's outcome)."""
        outcome = event.outcome
        assert outcome is not None, "only terminal events carry an outcome"
        usage = outcome.usage
        return cls(
            session_id=event.session_id,
            request_id=event.request_id,
            model=event.model,
            provider=event.provider,
            identity=event.identity,
            outcome=event.type,
            finished_at=event.at,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            duration_ms=outcome.duration_ms,
            first_token_ms=outcome.first_token_ms,
            exact=usage.exact,
            team=event.team,
            cost_usd=usage.cost_usd,
            cached_tokens=usage.cached_tokens,
            key_id=event.key_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "request_id": self.request_id,
            "model": self.model,
            "provider": self.provider,
            "identity": self.identity,
            "team": self.team,
            "key_id": self.key_id,
            "outcome": self.outcome,
            "finished_at": round(self.finished_at, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": self.cost_usd,
            "duration_ms": self.duration_ms,
            "first_token_ms": self.first_token_ms,
            "exact": self.exact,
        }


@attrs.define(slots=True)
class Tally:
    """Sums over any number of records."""

    sessions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    duration_ms: float = 0.0
    #: Sessions whose counts were estimated.
    estimated: int = 0
    outcomes: dict[str, int] = attrs.Factory(dict)
    #: US dollars; a session no plugin priced adds 0.
    cost_usd: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.sessions += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.reasoning_tokens += record.reasoning_tokens
        self.duration_ms += record.duration_ms
        self.estimated += not record.exact
        self.outcomes[record.outcome] = self.outcomes.get(record.outcome, 0) + 1
        if record.cost_usd is not None:
            self.cost_usd += record.cost_usd

    def merge(self, other: "Tally") -> None:
        self.sessions += other.sessions
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.duration_ms += other.duration_ms
        self.estimated += other.estimated
        self.cost_usd += other.cost_usd
        for outcome, count in other.outcomes.items():
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost_usd": round(self.cost_usd, COST_DECIMALS),
            "duration_ms": round(self.duration_ms, 3),
            "exact": self.estimated == 0,
            "estimated_sessions": self.estimated,
            # Sessions recovered after a crash are "interrupted" (the store's).
            "outcomes": {**{outcome: self.outcomes.get(outcome, 0) for outcome in OUTCOMES}, **{o: n for o, n in self.outcomes.items() if o not in OUTCOMES}},
        }


@attrs.frozen
class Filters:
    """What a usage query selects; None means any. Times are unix seconds,
    `since` inclusive and `until` exclusive."""

    model: str | None = None
    provider: str | None = None
    identity: str | None = None
    since: float | None = None
    until: float | None = None
    team: str | None = None

    def selects(self, key: Key) -> bool:
        model, provider, identity, team, _ = key
        return (
            (self.model is None or model == self.model)
            and (self.provider is None or provider == self.provider)
            and (self.identity is None or identity == self.identity)
            and (self.team is None or team == self.team)
        )

    def covers(self, at: float) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class Ledger:
    """Individual records, then time buckets, then all-time tallies; all bounded.

    Plain synchronous code: it runs on the trio loop's thread only (the listener,
    the service and the route), so it needs no lock.
    """

    def __init__(self, retention: float, max_records: int, bucket_seconds: int, max_buckets: int) -> None:
        self.retention = retention
        self.max_records = max_records
        self.bucket_seconds = bucket_seconds
        self.max_buckets = max_buckets
        #: (monotonic time it folds at, record), in arrival order.
        self.records: collections.deque[tuple[float, UsageRecord]] = collections.deque()
        #: bucket start (unix seconds) -> key -> tally.
        self.buckets: dict[int, dict[Key, Tally]] = {}
        #: What fell out of the oldest bucket: no time resolution left.
        self.history: dict[Key, Tally] = {}
        #: Everything in `history` finished before this time.
        self.history_until: float = 0.0
        self.folded = 0
        self.recorded = 0

    def add(self, record: UsageRecord, now: float) -> int:
        """Keep `record`; fold what is due or over the bound. Returns how many folded."""
        self.records.append((now + self.retention, record))
        self.recorded += 1
        return self.fold_due(now)

    def fold_due(self, now: float) -> int:
        folded = 0
        records = self.records
        while records and (records[0][0] <= now or len(records) > self.max_records):
            self._fold(records.popleft()[1])
            folded += 1
        return folded

    def _fold(self, record: UsageRecord) -> None:
        self.folded += 1
        start = int(record.finished_at // self.bucket_seconds) * self.bucket_seconds
        if start < self.history_until:
            # Its bucket was already folded away (a record that arrived late).
            self.history.setdefault(record.key, Tally()).add(record)
            return
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = self.buckets[start] = {}
        tally = bucket.get(record.key)
        if tally is None:
            tally = bucket[record.key] = Tally()
        tally.add(record)
        while len(self.buckets) > self.max_buckets:
            oldest = min(self.buckets)
            for key, old in self.buckets.pop(oldest).items():
                self.history.setdefault(key, Tally()).merge(old)
            self.history_until = max(self.history_until, float(oldest + self.bucket_seconds))

    def query(self, filters: Filters) -> dict[str, Any]:
        totals = Tally()
        by_model: dict[str, Tally] = {}
        by_provider: dict[str, Tally] = {}
        by_identity: dict[str, Tally] = {}
        by_key: dict[str, Tally] = {}

        def count(key: Key, add: Any) -> None:
            model, provider, identity, _, key_id = key
            for tally in (
                totals,
                by_model.setdefault(model, Tally()),
                by_provider.setdefault(provider, Tally()),
                by_identity.setdefault(identity, Tally()),
            ):
                add(tally)
            if key_id is not None:
                add(by_key.setdefault(key_id, Tally()))

        for _, record in self.records:
            if filters.selects(record.key) and filters.covers(record.finished_at):
                count(record.key, lambda tally: tally.add(record))
        for start, tallies in self.buckets.items():
            # At bucket resolution: a folded session counts at its bucket's start.
            if not filters.covers(start):
                continue
            for key, bucketed in tallies.items():
                if filters.selects(key):
                    count(key, lambda tally: tally.merge(bucketed))
        complete = True
        if self.history:
            reaches_back = filters.since is None or filters.since < self.history_until
            contains_all = filters.since is None and (filters.until is None or filters.until >= self.history_until)
            if contains_all:
                for key, old in self.history.items():
                    if filters.selects(key):
                        count(key, lambda tally: tally.merge(old))
            elif reaches_back:
                # Part of the window lies where only time-less tallies are left.
                complete = False

        def breakdown(tallies: dict[str, Tally]) -> dict[str, Any]:
            return {name: tally.to_json() for name, tally in sorted(tallies.items())}

        return {
            "object": "usage",
            "filters": filters.to_json(),
            "totals": totals.to_json(),
            "by_model": breakdown(by_model),
            "by_provider": breakdown(by_provider),
            "by_identity": breakdown(by_identity),
            "by_key": breakdown(by_key),
            "complete": complete,
        }

    def listed(self, filters: Filters, limit: int) -> list[UsageRecord]:
        """The individual records the filters select, newest first."""
        out: list[UsageRecord] = []
        for _, record in reversed(self.records):
            if len(out) >= limit:
                break
            if filters.selects(record.key) and filters.covers(record.finished_at):
                out.append(record)
        return out

    def describe(self, counts: bool = True) -> dict[str, Any]:
        """The ledger's state; without `counts` (for a caller restricted to part
        of it) only its settings, which say nothing of other callers' traffic."""
        settings = {"retention_seconds": self.retention, "max_records": self.max_records, "bucket_seconds": self.bucket_seconds}
        if not counts:
            return settings
        return {
            "records": len(self.records),
            "buckets": len(self.buckets),
            "recorded_sessions": self.recorded,
            "folded_sessions": self.folded,
            **settings,
            "history_until": self.history_until or None,
        }


# -- query parameters -------------------------------------------------------------


def _time_param(args: Any, name: str) -> float | None:
    raw = args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        raise InvalidRequest(f"'{name}' must be a unix time in seconds (a number >= 0), got '{shown}'", param=name)
    return value


def _name_param(args: Any, name: str) -> str | None:
    value = args.get(name)
    if value is None:
        return None
    if not value or len(value) > MAX_FILTER_CHARS:
        raise InvalidRequest(f"'{name}' must be a name of 1 to {MAX_FILTER_CHARS} characters", param=name)
    return value


def parse_filters(args: Any, extra: Iterable[str] = ()) -> Filters:
    """Validate the query string of a usage route; a bad value is a 400 naming it."""
    allowed = set(FILTERS) | set(extra)
    for name in args.keys():
        if name not in allowed:
            raise InvalidRequest(
                f"unknown query parameter '{name}'; the filters are {', '.join(FILTERS)}", param=name
            )
        if len(args.getlist(name)) > 1:
            raise InvalidRequest(f"'{name}' may be given once", param=name)
    since, until = _time_param(args, "since"), _time_param(args, "until")
    if since is not None and until is not None and until < since:
        raise InvalidRequest(f"'until' ({until:g}) must not be before 'since' ({since:g})", param="until")
    return Filters(
        _name_param(args, "model"), _name_param(args, "provider"), _name_param(args, "identity"), since, until, _name_param(args, "team")
    )


def visible(filters: Filters, principal: Principal) -> Filters | None:
    """The filters narrowed to what `principal` may see, or None when it asked
    for usage it may not see (answered as nothing, not as an error, so that
    asking does not tell whether there is any). The admin, and everyone when
    no plugin authenticates requests (anonymous), see what they ask; a team
    admin its team; anyone else its own identity."""
    if principal.is_admin or not principal.authenticated:
        return filters
    if principal.role == "team_admin" and principal.team is not None:
        if filters.team is not None and filters.team != principal.team:
            return None
        return attrs.evolve(filters, team=principal.team)
    if filters.identity is not None and filters.identity != principal.identity:
        return None
    return attrs.evolve(filters, identity=principal.identity)


def _nothing(filters: Filters) -> dict[str, Any]:
    """The answer to a question about usage the caller may not see."""
    return {
        "object": "usage",
        "filters": filters.to_json(),
        "totals": Tally().to_json(),
        "by_model": {},
        "by_provider": {},
        "by_identity": {},
        "by_key": {},
        "complete": True,
        "ledger": {},
    }


def _takes_team(method: Any) -> bool:
    """Whether a store's `usage` or `usage_records` takes the keyword `team`
    (contract 1.2; a store written for 1.1 does not)."""
    try:
        return "team" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


# -- the routes' OpenAPI operations ---------------------------------------------------

_ERROR = {"description": "A bad query parameter (`param` names it).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_FILTER_PARAMETERS = [
    *(
        _query(name, f"Only sessions of this {name}.", {"type": "string", "minLength": 1, "maxLength": MAX_FILTER_CHARS})
        for name in ("model", "provider", "identity", "team")
    ),
    _query("since", "Only sessions that finished at or after this unix time (seconds).", {"type": "number", "minimum": 0}),
    _query("until", "Only sessions that finished before this unix time (seconds); not before `since`.", {"type": "number", "minimum": 0}),
]

_TALLY = {
    "type": "object",
    "properties": {
        "sessions": {"type": "integer"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "reasoning_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cost_usd": {"type": "number", "description": "US dollars, by the pricing plugin's table; a session without a price counts 0."},
        "duration_ms": {"type": "number"},
        "exact": {"type": "boolean", "description": "False when some sessions' counts were estimated."},
        "estimated_sessions": {"type": "integer"},
        "outcomes": {"type": "object", "properties": {outcome: {"type": "integer"} for outcome in OUTCOMES}},
    },
}

_FILTERS_JSON = {"type": "object", "properties": {name: {"type": ["number", "null"] if name in ("since", "until") else ["string", "null"]} for name in FILTERS}}

_PRIVACY = (
    " A caller sees its own sessions; a team admin its team's; the admin key (and every caller, when nothing authenticates"
    " requests) all of them. Asking for usage the caller may not see answers nothing, not an error."
)

USAGE_OPENAPI = {
    "summary": "Token usage of finished sessions",
    "description": "Totals and breakdowns by model, provider and identity, with tokens and cost. Sessions older than the ledger's retention are counted at the resolution of their time bucket; `complete` is false when part of the window lies where only all-time tallies are left."
    + _PRIVACY,
    "parameters": _FILTER_PARAMETERS,
    "responses": {
        "200": {
            "description": "The usage the filters select.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "totals", "complete"],
                        "properties": {
                            "object": {"const": "usage"},
                            "filters": _FILTERS_JSON,
                            "totals": _TALLY,
                            "by_model": {"type": "object", "additionalProperties": _TALLY},
                            "by_provider": {"type": "object", "additionalProperties": _TALLY},
                            "by_identity": {"type": "object", "additionalProperties": _TALLY},
                            "by_key": {"type": "object", "additionalProperties": _TALLY, "description": "By API key id (sessions made with one)."},
                            "complete": {"type": "boolean"},
                            "ledger": {"type": "object"},
                        },
                    }
                }
            },
        },
        "400": _ERROR,
    },
}

SESSIONS_OPENAPI = {
    "summary": "Usage records of recently finished sessions",
    "description": "The individual records the ledger still keeps (not yet folded), newest first." + _PRIVACY,
    "parameters": [
        *_FILTER_PARAMETERS,
        _query("limit", f"At most this many records (default {DEFAULT_LISTED}).", {"type": "integer", "minimum": 1, "maximum": MAX_LISTED}),
    ],
    "responses": {
        "200": {
            "description": "The records.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "data"],
                        "properties": {
                            "object": {"const": "list"},
                            "data": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "session_id": {"type": "string"},
                                        "request_id": {"type": "string"},
                                        "model": {"type": "string"},
                                        "provider": {"type": "string"},
                                        "identity": {"type": "string"},
                                        "team": {"type": ["string", "null"]},
                                        "key_id": {"type": ["string", "null"]},
                                        "outcome": {"enum": [*OUTCOMES, "interrupted"], "description": "interrupted: recovered by the store after a crash"},
                                        "finished_at": {"type": "number"},
                                        "prompt_tokens": {"type": "integer"},
                                        "completion_tokens": {"type": "integer"},
                                        "reasoning_tokens": {"type": "integer"},
                                        "cached_tokens": {"type": "integer"},
                                        "total_tokens": {"type": "integer"},
                                        "cost_usd": {"type": ["number", "null"], "description": "US dollars; null when no plugin priced the model."},
                                        "duration_ms": {"type": "number"},
                                        "first_token_ms": {"type": ["number", "null"]},
                                        "exact": {"type": "boolean"},
                                    },
                                },
                            },
                            "filters": _FILTERS_JSON,
                        },
                    }
                }
            },
        },
        "400": _ERROR,
    },
}


# -- the plugin -------------------------------------------------------------------


@attrs.frozen
class _Metrics:
    records: Gauge
    buckets: Gauge
    folded: Counter
    reasoning: Counter
    cost: Counter


class UsagePlugin:
    Settings = Settings
    streamvisor_contract = "1.2"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.retention_seconds, settings.max_records, settings.bucket_seconds, settings.max_buckets)
        self.runtime: Any = None

    # -- the public API --------------------------------------------------------------

    def totals(
        self,
        model: str | None = None,
        provider: str | None = None,
        identity: str | None = None,
        since: float | None = None,
        until: float | None = None,
        team: str | None = None,
    ) -> dict[str, Any]:
        """The ledger's totals and breakdowns for the filters (all sessions by
        default): the body of `GET /v1/usage` for the admin, as a JSON-ready dict."""
        body = self.ledger.query(Filters(model, provider, identity, since, until, team))
        body["ledger"] = self.ledger.describe()
        return body

    def records(self, filters: Filters | None = None, limit: int = DEFAULT_LISTED) -> list[UsageRecord]:
        """The individual records still kept (not yet folded), newest first."""
        return self.ledger.listed(filters or Filters(), limit)

    # -- hooks --------------------------------------------------------------------

    @hookimpl
    def register_services(self, register: Any, runtime: Any) -> None:
        registry = runtime.metrics
        records = Gauge("streamvisor_usage_ledger_records", "Finished sessions the usage ledger keeps individually.", registry=registry)
        records.set_function(lambda: len(self.ledger.records))
        buckets = Gauge("streamvisor_usage_ledger_buckets", "Time buckets the usage ledger keeps folded sessions in.", registry=registry)
        buckets.set_function(lambda: len(self.ledger.buckets))
        self.metrics = _Metrics(
            records=records,
            buckets=buckets,
            folded=Counter("streamvisor_usage_folded_sessions", "Session records folded into the ledger's aggregates.", registry=registry),
            reasoning=Counter(
                "streamvisor_usage_reasoning_tokens",
                "Reasoning tokens of finished sessions (part of their completion tokens).",
                ["model", "provider"],
                registry=registry,
            ),
            cost=Counter(
                "streamvisor_usage_cost_usd",
                "What finished sessions cost in US dollars, by the registered price functions.",
                ["model", "provider"],
                registry=registry,
            ),
        )
        register("ledger", self.run_ledger)

    @hookimpl
    def register_routes(self, register: Any, runtime: Any) -> None:
        self.runtime = runtime
        register("/v1/usage", self.usage_view, openapi=USAGE_OPENAPI)
        register("/v1/usage/sessions", self.sessions_view, openapi=SESSIONS_OPENAPI)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("totals", self.totals_panel)

    @hookimpl
    @listens_to(*OUTCOMES)
    def on_event(self, event: Event) -> None:
        self._record(UsageRecord.from_event(event))

    # -- routes and panel -------------------------------------------------------------

    def totals_panel(self) -> dict[str, Any]:
        """All-time totals (every session the ledger saw) and the ledger's state."""
        body = self.totals()
        return {"totals": body["totals"], "by_model": body["by_model"], "ledger": body["ledger"]}

    async def usage_view(self) -> Any:
        asked = parse_filters(request.args)
        principal = current_principal()
        filters = visible(asked, principal)
        if filters is None:
            return json_response(_nothing(asked))
        store = self._store_for(filters, "usage")
        if store is not None:
            return json_response(await self.stored_totals(store, filters))
        body = self.ledger.query(filters)
        # The ledger's counts are the whole server's traffic: for those who see it all.
        body["ledger"] = self.ledger.describe(counts=principal.is_admin or not principal.authenticated)
        return json_response(body)

    def _store_for(self, filters: Filters, method: str) -> Any:
        """The store to answer from, or None for the memory ledger: there is no
        store, or it cannot filter by team (written for contract 1.1)."""
        store = None if self.runtime is None else self.runtime.store
        if store is not None and filters.team is not None and not _takes_team(getattr(store, method)):
            return None
        return store

    async def stored_totals(self, store: Any, filters: Filters) -> dict[str, Any]:
        """The totals of the store's ledger: it survives restarts, and a long
        window is one indexed query instead of a walk through memory."""
        args = (filters.model, filters.provider, filters.identity, filters.since, filters.until)
        rows = await (store.usage(*args) if filters.team is None else store.usage(*args, team=filters.team))
        totals = Tally()
        groups: dict[str, dict[str, Tally]] = {"by_model": {}, "by_provider": {}, "by_identity": {}, "by_key": {}}
        for row in rows:
            part = Tally(
                sessions=row.sessions,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                reasoning_tokens=row.reasoning_tokens,
                duration_ms=row.duration_ms,
                estimated=row.estimated,
                outcomes={row.outcome: row.sessions},
                cost_usd=row.cost_usd,
            )
            totals.merge(part)
            for group, name in (("by_model", row.model), ("by_provider", row.provider), ("by_identity", row.identity), ("by_key", row.key_id)):
                if name is not None:
                    groups[group].setdefault(name, Tally()).merge(part)
        return {
            "object": "usage",
            "filters": filters.to_json(),
            "totals": totals.to_json(),
            **{group: {name: tally.to_json() for name, tally in sorted(tallies.items())} for group, tallies in groups.items()},
            "complete": True,
            "ledger": {"source": "store"},
        }

    async def sessions_view(self) -> Any:
        asked = parse_filters(request.args, extra=("limit",))
        limit = DEFAULT_LISTED
        raw = request.args.get("limit")
        if raw is not None:
            # isdigit() alone admits "²", which int() refuses: ASCII digits only.
            if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LISTED:
                raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LISTED}, got '{raw[:40]}'", param="limit")
            limit = int(raw)
        filters = visible(asked, current_principal())
        if filters is None:
            return json_response({"object": "list", "data": [], "filters": asked.to_json()})
        store = self._store_for(filters, "usage_records")
        if store is None:
            data = [r.to_json() for r in self.records(filters, limit)]
        else:
            args = (filters.model, filters.provider, filters.identity, filters.since, filters.until, limit)
            data = await (store.usage_records(*args) if filters.team is None else store.usage_records(*args, team=filters.team))
        return json_response({"object": "list", "data": data, "filters": filters.to_json()})

    # -- recording and folding ---------------------------------------------------------

    def _record(self, record: UsageRecord) -> None:
        folded = self.ledger.add(record, time.monotonic())
        if folded:
            self.metrics.folded.inc(folded)
        if record.reasoning_tokens:
            self.metrics.reasoning.labels(record.model, record.provider).inc(record.reasoning_tokens)
        if record.cost_usd:
            self.metrics.cost.labels(record.model, record.provider).inc(record.cost_usd)

    async def run_ledger(self) -> None:
        """The service actor: fold records whose retention has passed."""
        interval = min(1.0, max(0.01, self.settings.retention_seconds / 4))
        while True:
            await trio.sleep(interval)
            self.tick()

    def tick(self) -> None:
        folded = self.ledger.fold_due(time.monotonic())
        if folded:
            self.metrics.folded.inc(folded)
