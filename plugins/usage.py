"""The `usage` plugin: the usage ledger, `GET /v1/usage`, and `<think>` parsing.

It owns three things:

- **The ledger.** Every session's terminal event (completed, failed, stopped,
  disconnected) becomes a `UsageRecord`: prompt, completion, reasoning and total
  tokens, processing time, and whether the counts are exact. Records are kept
  individually for `retention_seconds` (and at most `max_records` of them), then
  *folded* into per-time-bucket tallies keyed by (model, provider, identity);
  past `max_buckets` buckets, the oldest bucket folds into time-less all-time
  tallies. Folding never changes a total, only the time resolution. It happens
  eagerly when a record arrives (the count bound) and in the `ledger` service
  actor (the retention clock), so memory is released even when traffic stops.
- **Recovery of dropped terminal events.** Events reach a listener through a
  bounded queue that drops when full, and a dropped terminal event would be lost
  usage. When this plugin's listener has dropped events, the `ledger` service
  reads the finished sessions still in the runtime's registry and records those
  that no event recorded, so the ledger still sees every session.
- **Reasoning.** A chunk transformer turns `<think>…</think>` in a provider's
  `content` into `reasoning` deltas (sent as `reasoning_content`), holding back
  only what could be a partial tag, and counts the tokens that were reasoning
  when the provider's usage does not (`ThinkParser`).

The plugin's `totals()` is what the admin plugin shows on its status page.
"""

from __future__ import annotations

import collections
import logging
import math
import time
import weakref
from typing import Any, Iterable

import attrs
import trio
from prometheus_client import Counter, Gauge
from quart import request

from streamvisor.core.app import json_response
from streamvisor.core.chat import Delta, Usage
from streamvisor.core.errors import InvalidRequest
from streamvisor.core.events import Event
from streamvisor.hooks import hookimpl, listens_to

log = logging.getLogger("streamvisor.usage")

#: The outcomes a record can have: the terminal event types.
OUTCOMES = ("completed", "failed", "stopped", "disconnected")
#: A finished session is recovered from the registry only this long after it
#: finished, so its terminal event, if it was not dropped, has had time to arrive.
RECOVERY_GRACE_SECONDS = 0.5
#: Session ids recorded by recovery are remembered (so that a late terminal event
#: for one is not counted twice) up to this many.
MAX_RECOVERED_IDS = 10_000
#: `GET /v1/usage/sessions` lists at most this many records.
MAX_LISTED = 1000
DEFAULT_LISTED = 100
#: Longest filter value accepted (model, provider and identity names).
MAX_FILTER_CHARS = 256
FILTERS = ("model", "provider", "identity", "since", "until")


def _ge(bound: float):
    return attrs.validators.ge(bound)


def _tag(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    # The tag's length bounds what the parser holds back per session.
    if not 1 <= len(value) <= 64 or any(c.isspace() for c in value):
        raise ValueError(f"{attribute.name} must be 1 to 64 characters without whitespace, got {value!r}")


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
    #: Turn <think>…</think> in content into reasoning deltas and count them.
    parse_think_tags: bool = True
    think_open: str = attrs.field(default="<think>", validator=_tag)
    think_close: str = attrs.field(default="</think>", validator=_tag)

    def __attrs_post_init__(self) -> None:
        if self.think_open == self.think_close:
            raise ValueError("think_open and think_close must differ")


# -- records and tallies ----------------------------------------------------------

Key = tuple[str, str, str]  # (model, provider, identity)


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

    @property
    def key(self) -> Key:
        return (self.model, self.provider, self.identity)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_event(cls, event: Event) -> "UsageRecord":
        data = event.data
        usage = data.get("usage") or {}
        details = usage.get("completion_tokens_details") or {}
        return cls(
            session_id=event.session_id,
            request_id=event.request_id,
            model=event.model,
            provider=event.provider,
            identity=event.identity,
            outcome=event.type,
            finished_at=event.at,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            reasoning_tokens=int(details.get("reasoning_tokens") or 0),
            duration_ms=float(data.get("duration_ms") or 0.0),
            first_token_ms=data.get("first_token_ms"),
            exact=bool(usage.get("exact", False)),
        )

    @classmethod
    def from_session(cls, session: Any) -> "UsageRecord":
        """The record a finished session's terminal event would have given."""
        usage = session.usage or Usage(exact=False)
        timings = session.timings()
        return cls(
            session_id=session.id,
            request_id=session.request_id,
            model=session.model,
            provider=session.provider,
            identity=session.identity,
            outcome="stopped" if session.state == "shutdown" else session.state,
            finished_at=session.created + (session.finished_at - session.t0),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            duration_ms=timings["duration_ms"] or 0.0,
            first_token_ms=timings["first_token_ms"],
            exact=usage.exact,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "request_id": self.request_id,
            "model": self.model,
            "provider": self.provider,
            "identity": self.identity,
            "outcome": self.outcome,
            "finished_at": round(self.finished_at, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
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

    def add(self, record: UsageRecord) -> None:
        self.sessions += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.reasoning_tokens += record.reasoning_tokens
        self.duration_ms += record.duration_ms
        self.estimated += not record.exact
        self.outcomes[record.outcome] = self.outcomes.get(record.outcome, 0) + 1

    def merge(self, other: "Tally") -> None:
        self.sessions += other.sessions
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.duration_ms += other.duration_ms
        self.estimated += other.estimated
        for outcome, count in other.outcomes.items():
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + count

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "duration_ms": round(self.duration_ms, 3),
            "exact": self.estimated == 0,
            "estimated_sessions": self.estimated,
            "outcomes": {outcome: self.outcomes.get(outcome, 0) for outcome in OUTCOMES},
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

    def selects(self, key: Key) -> bool:
        model, provider, identity = key
        return (
            (self.model is None or model == self.model)
            and (self.provider is None or provider == self.provider)
            and (self.identity is None or identity == self.identity)
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

        def count(key: Key, add: Any) -> None:
            model, provider, identity = key
            for tally in (
                totals,
                by_model.setdefault(model, Tally()),
                by_provider.setdefault(provider, Tally()),
                by_identity.setdefault(identity, Tally()),
            ):
                add(tally)

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

    def describe(self) -> dict[str, Any]:
        return {
            "records": len(self.records),
            "buckets": len(self.buckets),
            "recorded_sessions": self.recorded,
            "folded_sessions": self.folded,
            "retention_seconds": self.retention,
            "max_records": self.max_records,
            "bucket_seconds": self.bucket_seconds,
            "history_until": self.history_until or None,
        }


# -- <think> parsing -------------------------------------------------------------


@attrs.define(slots=True)
class _Segment:
    """The characters one usage report covers, and how many were reasoning."""

    pending: int  # not classified yet (held back as a possible partial tag)
    chars: int
    reasoning: int = 0
    tokens: int | None = None  # the report's token increment; None until it comes


class ThinkParser:
    """One session's `<think>` state: inside or outside a block, the held-back
    text that may be a partial tag, and which tokens were reasoning.

    Token counting: each usage report's increment of `completion_tokens` is
    spread over the characters received since the previous report, in
    proportion to how many of them were reasoning (tag characters count as
    reasoning). With one delta per token (the local model) this counts exactly
    the tokens that were reasoning; with a usage report only at the end it is an
    estimate by characters. Segments wait only for held-back characters, so at
    most a tag's length of them exist at once.
    """

    __slots__ = (
        "open_tag", "close_tag", "in_think", "held", "skip_space", "tracking", "segments",
        "unsettled_chars", "last_completion", "last_usage", "reasoning", "stated", "provider_counts",
    )

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.in_think = False
        self.held = ""
        #: After a tag, leading whitespace is dropped ("<think>\n", "</think>\n\n").
        self.skip_space = False
        #: Token attribution starts with the first delta that may hold a tag.
        self.tracking = False
        self.segments: collections.deque[_Segment] = collections.deque()
        self.unsettled_chars = 0
        self.last_completion = 0
        self.last_usage: Usage | None = None
        self.reasoning = 0.0
        self.stated = 0
        #: The provider reports reasoning tokens itself: never restate its usage.
        self.provider_counts = False

    # -- text ---------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, str]:
        """Parse the next piece of content; return (content, reasoning) to send."""
        if not self.tracking:
            self.tracking = True
            if self.unsettled_chars:
                # Characters since the last usage report, all content so far.
                self.segments.append(_Segment(pending=0, chars=self.unsettled_chars))
        self._receive(len(text))
        buf = self.held + text if self.held else text
        self.held = ""
        content: list[str] = []
        reasoning: list[str] = []
        i, end = 0, len(buf)
        while i < end:
            if self.skip_space:
                j = i
                while j < end and buf[j].isspace():
                    j += 1
                self._classify(j - i, self.in_think)
                i = j
                if i == end:
                    break
                self.skip_space = False
            tag = self.close_tag if self.in_think else self.open_tag
            out = reasoning if self.in_think else content
            found = buf.find(tag, i)
            if found < 0:
                keep = _partial_suffix(buf, i, tag)
                if end - keep > i:
                    out.append(buf[i : end - keep])
                    self._classify(end - keep - i, self.in_think)
                self.held = buf[end - keep :]
                break
            if found > i:
                out.append(buf[i:found])
                self._classify(found - i, self.in_think)
            self._classify(len(tag), True)
            self.in_think = not self.in_think
            self.skip_space = True
            i = found + len(tag)
        return "".join(content), "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        """The stream is ending: what was held back was not a tag after all."""
        held, self.held = self.held, ""
        if not held:
            return "", ""
        self._classify(len(held), self.in_think)
        return ("", held) if self.in_think else (held, "")

    # -- tokens -------------------------------------------------------------------

    def account(self, usage: Usage | None, text_chars: int) -> Usage | None:
        """Take this delta's usage into account; return the usage to restate on
        the delta (with the reasoning tokens counted so far), or None to leave it."""
        if not self.tracking:
            self.unsettled_chars += text_chars
        if usage is not None:
            if usage.reasoning_tokens:
                self.provider_counts = True
            added = max(0, usage.completion_tokens - self.last_completion)
            self.last_completion = usage.completion_tokens
            self.last_usage = usage
            if self.tracking:
                self._close(added)
            else:
                self.unsettled_chars = 0
        if not self.tracking or self.provider_counts or self.last_usage is None:
            return None
        self._settle()
        counted = min(int(self.reasoning + 0.5), self.last_usage.completion_tokens)
        if counted == self.stated and (usage is None or counted == 0):
            return None
        self.stated = counted
        return attrs.evolve(self.last_usage, reasoning_tokens=counted)

    def _receive(self, chars: int) -> None:
        if not chars:
            return
        last = self.segments[-1] if self.segments else None
        if last is not None and last.tokens is None:
            last.chars += chars
            last.pending += chars
        else:
            self.segments.append(_Segment(pending=chars, chars=chars))

    def _close(self, tokens: int) -> None:
        last = self.segments[-1] if self.segments else None
        if last is not None and last.tokens is None:
            last.tokens = tokens
        elif last is not None and last.chars == 0:
            last.tokens = (last.tokens or 0) + tokens  # merged: keeps the deque bounded
        elif tokens:
            self.segments.append(_Segment(pending=0, chars=0, tokens=tokens))

    def _classify(self, chars: int, reasoning: bool) -> None:
        for segment in self.segments:
            if not chars:
                return
            if segment.pending:
                take = min(chars, segment.pending)
                segment.pending -= take
                if reasoning:
                    segment.reasoning += take
                chars -= take

    def _settle(self) -> None:
        segments = self.segments
        while segments and segments[0].tokens is not None and segments[0].pending == 0:
            segment = segments.popleft()
            if segment.chars:
                self.reasoning += segment.tokens * segment.reasoning / segment.chars
            elif self.in_think:
                # Tokens without text (an unfinished UTF-8 sequence, an end token)
                # belong to the block they arrived in.
                self.reasoning += segment.tokens


def _partial_suffix(buf: str, start: int, tag: str) -> int:
    """The length of the longest end of `buf[start:]` that begins `tag`."""
    limit = min(len(tag) - 1, len(buf) - start)
    if limit <= 0 or tag[0] not in buf[len(buf) - limit :]:
        return 0
    for k in range(limit, 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


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
    return Filters(_name_param(args, "model"), _name_param(args, "provider"), _name_param(args, "identity"), since, until)


# -- the plugin -------------------------------------------------------------------


@attrs.frozen
class _Metrics:
    records: Gauge
    buckets: Gauge
    folded: Counter
    recovered: Counter
    reasoning: Counter


class UsagePlugin:
    Settings = Settings

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = Ledger(settings.retention_seconds, settings.max_records, settings.bucket_seconds, settings.max_buckets)
        self.runtime: Any = None
        self.metrics: _Metrics | None = None
        #: The name plugins.toml gives this plugin (for its listener's stats).
        self.name = "usage"
        #: Parser state per live session, removed with the session's terminal event.
        self.parsers: dict[str, ThinkParser] = {}
        self._parsers_checked_at = 64
        #: Sessions recorded from their terminal event (weak: the registry owns them).
        self._recorded: weakref.WeakSet[Any] = weakref.WeakSet()
        #: Session ids recorded by recovery, so that a late event is not counted twice.
        self._recovered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.recovered = 0
        self._drops_seen = 0
        self._recover_until = 0.0

    # -- the public API --------------------------------------------------------------

    def totals(
        self,
        model: str | None = None,
        provider: str | None = None,
        identity: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> dict[str, Any]:
        """The ledger's totals and breakdowns for the filters (all sessions by
        default): the body of `GET /v1/usage`, as a JSON-ready dict."""
        body = self.ledger.query(Filters(model, provider, identity, since, until))
        body["ledger"] = {**self.ledger.describe(), "recovered_sessions": self.recovered}
        return body

    def records(self, filters: Filters | None = None, limit: int = DEFAULT_LISTED) -> list[UsageRecord]:
        """The individual records still kept (not yet folded), newest first."""
        return self.ledger.listed(filters or Filters(), limit)

    # -- hooks --------------------------------------------------------------------

    @hookimpl
    def startup(self, runtime: Any) -> None:
        self.runtime = runtime
        for loaded in runtime.plugins:
            if loaded.plugin is self:
                self.name = loaded.name
        registry = runtime.metrics
        records = Gauge("streamvisor_usage_ledger_records", "Finished sessions the usage ledger keeps individually.", registry=registry)
        records.set_function(lambda: len(self.ledger.records))
        buckets = Gauge("streamvisor_usage_ledger_buckets", "Time buckets the usage ledger keeps folded sessions in.", registry=registry)
        buckets.set_function(lambda: len(self.ledger.buckets))
        self.metrics = _Metrics(
            records=records,
            buckets=buckets,
            folded=Counter("streamvisor_usage_folded_sessions", "Session records folded into the ledger's aggregates.", registry=registry),
            recovered=Counter(
                "streamvisor_usage_recovered_sessions",
                "Sessions recorded from the session registry because their terminal event was dropped.",
                registry=registry,
            ),
            reasoning=Counter(
                "streamvisor_usage_reasoning_tokens",
                "Reasoning tokens of finished sessions (part of their completion tokens).",
                ["model", "provider"],
                registry=registry,
            ),
        )

    @hookimpl
    def register_services(self, register: Any) -> None:
        register("ledger", self.run_ledger)

    @hookimpl
    def register_chunk_transformers(self, register: Any) -> None:
        if self.settings.parse_think_tags:
            register(self.split_reasoning)

    @hookimpl
    def register_routes(self, register: Any) -> None:
        register("/v1/usage", self.usage_view)
        register("/v1/usage/sessions", self.sessions_view)

    @hookimpl
    @listens_to("completed", "failed", "stopped", "disconnected")
    def on_event(self, event: Event) -> None:
        self.parsers.pop(event.session_id, None)
        if event.session_id in self._recovered:
            del self._recovered[event.session_id]  # recovery recorded it already
            return
        if self.runtime is not None:
            session = self.runtime.sessions.sessions.get(event.session_id)
            if session is not None:
                self._recorded.add(session)
        self._record(UsageRecord.from_event(event))

    # -- routes ---------------------------------------------------------------------

    async def usage_view(self) -> Any:
        filters = parse_filters(request.args)
        return json_response(self.totals(**attrs.asdict(filters)))

    async def sessions_view(self) -> Any:
        filters = parse_filters(request.args, extra=("limit",))
        limit = DEFAULT_LISTED
        raw = request.args.get("limit")
        if raw is not None:
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_LISTED:
                raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_LISTED}, got '{raw[:40]}'", param="limit")
            limit = int(raw)
        records = self.records(filters, limit)
        return json_response({"object": "list", "data": [r.to_json() for r in records], "filters": filters.to_json()})

    # -- recording and folding ---------------------------------------------------------

    def _record(self, record: UsageRecord) -> None:
        folded = self.ledger.add(record, time.monotonic())
        if self.metrics is not None:
            if folded:
                self.metrics.folded.inc(folded)
            if record.reasoning_tokens:
                self.metrics.reasoning.labels(record.model, record.provider).inc(record.reasoning_tokens)

    async def run_ledger(self) -> None:
        """The service actor: fold records whose retention has passed, recover
        sessions whose terminal event was dropped, forget parser state of
        sessions that ended without one."""
        interval = min(1.0, max(0.01, self.settings.retention_seconds / 4))
        while True:
            await trio.sleep(interval)
            self.tick(interval)

    def tick(self, interval: float = 1.0) -> None:
        folded = self.ledger.fold_due(time.monotonic())
        if folded and self.metrics is not None:
            self.metrics.folded.inc(folded)
        if self.runtime is None:
            return
        self._recover(interval)
        if len(self.parsers) > self.runtime.sessions.live:
            self._forget_parsers()

    def _listener_drops(self) -> int:
        for stats in self.runtime.events.stats:
            if stats.plugin == self.name:
                return stats.dropped
        return 0

    def _recover(self, interval: float) -> None:
        now = time.monotonic()
        drops = self._listener_drops()
        if drops > self._drops_seen:
            # A dropped event may have been a terminal one: look at finished
            # sessions for as long as the registry keeps the ones that just ended.
            self._drops_seen = drops
            retention = self.runtime.config.server.session_retention_seconds
            self._recover_until = now + retention + RECOVERY_GRACE_SECONDS + 2 * interval
        if now >= self._recover_until:
            return
        clock = time.perf_counter()
        for session in list(self.runtime.sessions.sessions.values()):
            if (
                not session.finished
                or session.finished_at is None
                or clock - session.finished_at < RECOVERY_GRACE_SECONDS
                or session in self._recorded
                or session.id in self._recovered
            ):
                continue
            self._recovered[session.id] = None
            while len(self._recovered) > MAX_RECOVERED_IDS:
                self._recovered.popitem(last=False)
            self.parsers.pop(session.id, None)
            self.recovered += 1
            if self.metrics is not None:
                self.metrics.recovered.inc()
            log.info("recorded the usage of session %s from the registry (its terminal event was dropped)", session.id)
            self._record(UsageRecord.from_session(session))

    def _forget_parsers(self) -> None:
        """Drop parser state whose session has ended (its terminal event was dropped)."""
        sessions = self.runtime.sessions.sessions
        for session_id in list(self.parsers):
            session = sessions.get(session_id)
            if session is None or session.finished:
                del self.parsers[session_id]

    # -- the chunk transformer ------------------------------------------------------------

    def split_reasoning(self, delta: Delta, session: Any) -> Delta:
        parser = self.parsers.get(session.id)
        if parser is None:
            if len(self.parsers) >= self._parsers_checked_at and self.runtime is not None:
                # Amortised: a sweep at most every time the dict doubles.
                self._forget_parsers()
                self._parsers_checked_at = 2 * len(self.parsers) + 64
            parser = self.parsers[session.id] = ThinkParser(self.settings.think_open, self.settings.think_close)
        text = delta.content or ""
        if not (parser.tracking or parser.held or parser.open_tag[0] in text):
            # The common case: no tag seen, none held back, and none can start in
            # this text.
            if delta.usage is None and not parser.tracking:
                parser.unsettled_chars += len(text)  # what account() does for it, without the call
            else:
                parser.account(delta.usage, len(text))
            return delta
        content, reasoning = parser.feed(text)
        if delta.finish_reason is not None:
            more_content, more_reasoning = parser.flush()
            content += more_content
            reasoning += more_reasoning
        usage = parser.account(delta.usage, len(text))
        changes: dict[str, Any] = {}
        if content != text:
            changes["content"] = content or None
        if reasoning:
            changes["reasoning"] = (delta.reasoning or "") + reasoning
        if usage is not None:
            changes["usage"] = usage
        return attrs.evolve(delta, **changes) if changes else delta
