"""The fault mix: thousands of streamed requests through a gateway whose
upstream, at set rates, streams normally, resets the connection, answers 5xx
or 429, goes silent or sends a malformed event, and what must hold at the end.

Owns: the mix (`RATES`, and `Mix`, which picks each upstream answer for
`streamvisor.testing.FakeUpstream`), the gateway it runs behind
(`gateway_toml`: the `openai` provider, `retry` with three attempts and no
circuit breaker, `usage`, and an `EventLog`), the client that sends and
classifies each request (`one_request`), paging through the usage ledger
(`ledger_records`, also used by bench/storm.py), and `run`, which checks every
property and returns the figures. `tests/test_faultmix.py` runs 300 requests;
`python -m bench.reliability` runs 10,000.

What must hold: every request ends completed or in an error the client can
read (nothing cut, nothing hanging); no session and no upstream connection is
left behind; the usage ledger holds every session with the usage its client
was told, to the token; and retries never duplicated a chunk. Every word of
the upstream's stream names its answer (`w3/517`: word 3 of upstream answer
517), so a chunk sent twice, or chunks of two answers in one stream, show.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import random
import threading
import time
from typing import Any, Callable

import attrs
import httpx

from streamvisor.hooks import TERMINAL_TYPES, hookimpl, listens_to
from streamvisor.testing import EventLog, FakeUpstream, Reply, sse, start_server

#: Words of a normal answer, and the prompt tokens the upstream reports.
WORDS = 20
PROMPT_TOKENS = 7
MODEL = "m1"
PROVIDER = "mix"
#: The upstream's timeouts in the gateway: short, so that silence costs little.
READ_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
#: What the upstream does with each request it gets (every attempt, retries
#: included), and how often. "At" a position: after that many chunks (0:
#: before the first one, so retried; later: mid-stream, so not).
RATES: dict[str, float] = {
    "normal": 0.64,
    "reset before the first chunk": 0.05,  # no answer at all, or headers and then a reset
    "reset mid-stream": 0.04,
    "5xx": 0.08,  # 500, 502 or 503
    "429 with Retry-After": 0.08,  # Retry-After 0 or 0.05
    "silence": 0.05,  # at a random position: a read timeout
    "malformed event": 0.06,  # a data line that is not JSON, at a random position
}
#: A request's words come from one upstream answer: "w{i}/{answer}".
_WORD = "w{i}/{answer}"


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


def normal_events(answer: int) -> tuple[bytes, ...]:
    """A normal answer: WORDS chunks, each with the cumulative usage so far (so
    that a stream cut anywhere has exact partial usage), the usage chunk, [DONE]."""
    events: list[Any] = []
    for i in range(WORDS):
        choice = {"index": 0, "delta": {"content": _WORD.format(i=i, answer=answer) + " "}, "finish_reason": "stop" if i == WORDS - 1 else None}
        events.append({"id": f"chatcmpl-{answer}", "object": "chat.completion.chunk", "model": MODEL, "choices": [choice], "usage": _usage(i + 1)})
    events.append({"id": f"chatcmpl-{answer}", "object": "chat.completion.chunk", "model": MODEL, "choices": [], "usage": _usage(WORDS)})
    events.append("[DONE]")
    return sse(*events)


def _error(status: int, message: str, **headers: str) -> Reply:
    body = json.dumps({"error": {"message": message}}).encode()
    return Reply(status, {"Content-Type": "application/json", **headers}, body)


class Mix:
    """The fake upstream's chooser: each answer drawn from `RATES` with a seeded
    generator. Called under the fake's lock, one request at a time."""

    def __init__(self, seed: int = 9, rates: dict[str, float] = RATES) -> None:
        self.rng = random.Random(seed)
        self.kinds = list(rates)
        self.weights = list(rates.values())
        self.answers = 0
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, body: Any) -> Reply:
        rng = self.rng
        self.answers += 1
        answer = self.answers
        kind = rng.choices(self.kinds, self.weights)[0]
        self.counts[kind] += 1
        events = normal_events(answer)
        # A position within the stream: half the time before the first chunk.
        at = 0 if rng.random() < 0.5 else rng.randint(1, WORDS - 1)
        if kind == "normal":
            return Reply(chunks=events)
        if kind == "reset before the first chunk":
            if rng.random() < 0.5:
                return Reply(raw=True, reset_after=0)  # a reset instead of any answer
            return Reply(chunks=events, reset_after=0)  # the headers, then a reset
        if kind == "reset mid-stream":
            return Reply(chunks=events, reset_after=rng.randint(1, WORDS - 1))
        if kind == "5xx":
            status = rng.choice((500, 502, 503))
            return _error(status, f"the fake upstream fails with {status}")
        if kind == "429 with Retry-After":
            return _error(429, "slow down", **{"Retry-After": rng.choice(("0", "0.05"))})
        if kind == "silence":
            return Reply(chunks=events, hang_after=at)
        if kind == "malformed event":
            return Reply(chunks=events[:at] + sse('{"choices": [{"delta": {"content": "w'))
        raise AssertionError(kind)


def gateway_toml(upstream_url: str, *, max_records: int = 20_000) -> str:
    """The gateway under test. Retry: three attempts, a short backoff, and no
    circuit breaker, so that the run measures retries rather than the breaker
    skipping the upstream. The ledger keeps every record individually for the
    check. `events` is the run's `EventLog`."""
    return f"""
[plugins.retry]
attempts = 3
backoff_initial = 0.01
jitter = 0.01

[plugins.retry.circuit]
enabled = false

[plugins.usage]
retention_seconds = 3600
max_records = {max_records}

[plugins.openai]
[[plugins.openai.upstreams]]
name = "{PROVIDER}"
base_url = "{upstream_url}"
models = ["{MODEL}"]
connect_timeout = {CONNECT_TIMEOUT}
read_timeout = {READ_TIMEOUT}

[plugins.events]
"""


class SessionLog(EventLog):
    """`streamvisor.testing.EventLog` without the per-chunk events: thousands of
    streams would keep hundreds of thousands of them, and nothing here reads them."""

    @hookimpl
    @listens_to(exclude=("chunk",))
    def on_event(self, event: Any) -> None:
        super().on_event(event)


# -- the client ------------------------------------------------------------------------


@attrs.define
class Seen:
    """What one client saw."""

    index: int
    #: "completed" ([DONE]), "error-status" (an error envelope before any chunk),
    #: "error-event" (a terminal error event after chunks); anything else is
    #: wrong: "cut" (the body ended with neither), "client-timeout",
    #: "no-session" (an answer without X-Session-ID), "garbled" (not the wire format).
    kind: str = "cut"
    status: int = 0
    code: str | None = None
    session_id: str | None = None
    #: The words of the content, in order.
    words: list[str] = attrs.field(factory=list)
    #: The usage chunk (include_usage), as sent.
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None


def one_request(http: httpx.Client, index: int) -> Seen:
    """One streamed completion with include_usage; how it ended and what it held."""
    seen = Seen(index)
    body = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"request {index}"}],
    }
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-ID": f"fm-{index}"}) as response:
            seen.status = response.status_code
            seen.session_id = response.headers.get("X-Session-ID")
            if response.status_code != 200:
                seen.code = json.loads(response.read())["error"]["code"]
                seen.kind = "error-status" if seen.session_id else "no-session"
                return seen
            last = None
            text = []
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if last is not None:
                    seen.kind = "garbled"  # something after [DONE] or after an error event
                    return seen
                if data == "[DONE]":
                    last = "done"
                    continue
                event = json.loads(data)
                if "error" in event:
                    seen.code = event["error"].get("code")
                    last = "error"
                    continue
                if event.get("usage") is not None:
                    seen.usage = event["usage"]
                for choice in event.get("choices") or []:
                    text.append(choice.get("delta", {}).get("content") or "")
                    seen.finish_reason = choice.get("finish_reason") or seen.finish_reason
            seen.words = "".join(text).split()
            if not seen.session_id:
                seen.kind = "no-session"
            elif last == "done":
                seen.kind = "completed"
            elif last == "error":
                seen.kind = "error-event"
    except httpx.TimeoutException:
        seen.kind = "client-timeout"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        seen.kind = f"garbled ({type(exc).__name__})"
    return seen


def word_faults(words: list[str], completed: bool) -> tuple[bool, bool]:
    """(duplicated, misordered) for one stream's words: duplicated when a word
    index repeats or the words come from more than one upstream answer;
    misordered when they are not w0, w1, ... in order (and, for a completed
    stream, not exactly WORDS of them)."""
    parsed = []
    for word in words:
        head, _, answer = word.partition("/")
        if not head.startswith("w") or not head[1:].isdigit() or not answer.isdigit():
            return False, True
        parsed.append((int(head[1:]), answer))
    indices = [i for i, _ in parsed]
    duplicated = len(set(indices)) != len(indices) or len({a for _, a in parsed}) > 1
    misordered = indices != list(range(len(indices))) or (completed and len(indices) != WORDS)
    return duplicated, misordered


# -- the ledger ------------------------------------------------------------------------


def ledger_records(http: httpx.Client, since: float = 0.0, until: float | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
    """Every individual record of the usage ledger that finished in [since,
    until), through `GET /v1/usage/sessions`, which lists at most `limit` (1000)
    at a time: a window that comes back full is split in two, and the halves
    are asked for (the route's windows are exact: `since` inclusive, `until`
    exclusive, on the record's own finish time)."""
    until = time.time() + 3600 if until is None else until
    response = http.get("/v1/usage/sessions", params={"since": repr(since), "until": repr(until), "limit": limit})
    response.raise_for_status()
    data = response.json()["data"]
    if len(data) < limit:
        return data
    middle = (since + until) / 2
    if not since < middle < until:
        raise RuntimeError(f"more than {limit} usage records finished at {since!r}")
    return ledger_records(http, since, middle, limit=limit) + ledger_records(http, middle, until, limit=limit)


def _tokens(usage: Any) -> tuple[int, int, int]:
    """(prompt, completion, total) of a Usage, an OpenAI usage dict or a record."""
    if isinstance(usage, dict):
        return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- the run ---------------------------------------------------------------------------


def run(
    requests: int = 10_000,
    *,
    concurrency: int = 24,
    seed: int = 9,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Send `requests` streamed requests through the gateway, `concurrency` at
    once, and check the run. Returns plain numbers:

    - `requests`; `completed` (the client got `[DONE]`); `terminal_errors` (an
      error envelope before the first chunk, `error_status`, or a terminal error
      event after chunks, `error_event`); `other`: anything else, a cut stream,
      a client timeout, a 200 without `[DONE]`, an answer without a session
      (must be 0; `other_kinds` names them);
    - `live_sessions_after` (0); `upstream_open_beyond_pool`: connections open
      at the fake upstream minus the gateway's idle keep-alive pool, once
      everything settled (0); `upstream_open_after_stop`: open at the fake once
      the gateway stopped (0);
    - `usage_mismatches`: completed streams whose usage chunk differs from the
      session's terminal event, or is missing (0); `partial_usage_mismatches`:
      streams that failed after chunks whose terminal usage is not exactly the
      words the client got, or failed before any chunk with completion tokens
      (0); `ledger_mismatches`: sessions with no ledger record, or one whose
      tokens or outcome differ from the terminal event (0); `failed_not_in_ledger`
      (0); `ledger_totals_diff`: `GET /v1/usage` totals (sessions, prompt,
      completion and total tokens) minus the sums over the terminal events, the
      largest difference (0); `terminal_events_not_one`: sessions without
      exactly one terminal event (0);
    - `duplicated_chunks`: streams in which a word index repeats or words of two
      upstream answers mix (0); `misordered_streams`: streams whose words are
      not w0, w1, ... in order, or completed ones without all WORDS (0);
    - `retries` (from the `retry` events), `retries_by_reason`,
      `upstream_requests` (POSTs the fake got), `attempts_unaccounted`:
      upstream requests minus sessions minus retries (0: every attempt is a
      session's first or one of its announced retries);
    - `upstream_answers`: what the upstream did, by kind; `error_codes`: the
      error codes clients saw, with counts; `completion_tokens`: the ledger's
      total; `seconds` and `requests_per_s`.
    """
    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    mix = Mix(seed)
    events = SessionLog()
    seen: list[Seen] = []
    with FakeUpstream(models=(MODEL,)) as upstream:
        upstream.choose(mix)
        with start_server(gateway_toml(upstream.url, max_records=max(20_000, requests + 100)), plugins={"events": events}, log_level="error") as server:
            http = httpx.Client(
                base_url=server.url,
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            )
            try:
                say(f"fault mix: {requests} streamed requests, {concurrency} at once")
                started = time.perf_counter()
                done = 0
                lock = threading.Lock()

                def one(index: int) -> Seen:
                    nonlocal done
                    result = one_request(http, index)
                    with lock:
                        done += 1
                        if done % 1000 == 0:
                            say(f"fault mix: {done}/{requests}")
                    return result

                with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                    seen = list(pool.map(one, range(requests)))
                streamed = time.perf_counter() - started
                sessions = {s.session_id for s in seen if s.session_id}
                # Let the ledger and the event log take in every terminal event.
                _wait(lambda: server.call(lambda: server.runtime.sessions.live_count) == 0, 30)
                _wait(lambda: sum(e.terminal for e in events.of()) >= len(sessions), 30)
                _wait(lambda: http.get("/v1/usage").json()["totals"]["sessions"] >= len(sessions), 30)
                live_after = server.call(lambda: server.runtime.sessions.live_count)
                provider = server.call(lambda: server.runtime.providers.get(PROVIDER))

                def beyond_pool() -> int:
                    # The fake counts a connection until its handler sees the close.
                    return upstream.open_connections - server.call(lambda: provider.client.idle_connections)

                _wait(lambda: beyond_pool() == 0, 10)
                open_beyond_pool = beyond_pool()
                totals = http.get("/v1/usage").json()["totals"]
                records = {r["session_id"]: r for r in ledger_records(http)}
            finally:
                http.close()
        _wait(lambda: upstream.open_connections == 0, 10)
        open_after_stop = upstream.open_connections
        upstream_requests = upstream.posts

    # -- the checks, over what the clients saw and what the gateway recorded --------
    terminal: dict[str, list[Any]] = collections.defaultdict(list)
    retries: collections.Counter[str] = collections.Counter()
    for event in events.of():
        if event.type in TERMINAL_TYPES:
            terminal[event.session_id].append(event)
        elif event.type == "retry":
            retries[event.data["reason"]] += 1
    kinds = collections.Counter(s.kind for s in seen)
    sessions = {s.session_id for s in seen if s.session_id}
    usage_mismatches = partial_mismatches = duplicated = misordered = 0
    ledger_mismatches = failed_missing = 0
    for s in seen:
        events_of = terminal.get(s.session_id or "", [])
        event = events_of[0] if len(events_of) == 1 else None
        dup, order = word_faults(s.words, s.kind == "completed")
        duplicated += dup
        misordered += order and s.kind in ("completed", "error-event")
        if s.kind == "completed":
            usage_mismatches += event is None or s.usage is None or _tokens(s.usage) != _tokens(event.usage) or not event.usage.exact
        elif s.kind == "error-event":
            partial_mismatches += event is None or not event.usage.exact or event.usage.completion_tokens != len(s.words)
        elif s.kind == "error-status":
            partial_mismatches += event is None or event.usage.completion_tokens != 0
        if s.session_id is None:
            continue
        record = records.get(s.session_id)
        if event is not None and event.type == "failed" and record is None:
            failed_missing += 1
        if record is None or event is None or record["outcome"] != event.type or _tokens(record) != _tokens(event.usage):
            ledger_mismatches += 1
    sums = [0, 0, 0, 0]
    for events_of in terminal.values():
        usage = events_of[0].usage
        for i, value in enumerate((1, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)):
            sums[i] += value
    ledger_sums = (totals["sessions"], totals["prompt_tokens"], totals["completion_tokens"], totals["total_tokens"])
    completed = kinds["completed"]
    error_status, error_event = kinds["error-status"], kinds["error-event"]
    other = requests - completed - error_status - error_event
    total_retries = sum(retries.values())
    seconds = time.perf_counter() - t0
    return {
        "requests": requests,
        "completed": completed,
        "terminal_errors": error_status + error_event,
        "other": other,
        "live_sessions_after": live_after,
        "upstream_open_beyond_pool": open_beyond_pool,
        "upstream_open_after_stop": open_after_stop,
        "usage_mismatches": usage_mismatches,
        "partial_usage_mismatches": partial_mismatches,
        "ledger_mismatches": ledger_mismatches,
        "failed_not_in_ledger": failed_missing,
        "ledger_totals_diff": max(abs(a - b) for a, b in zip(ledger_sums, sums)),
        "terminal_events_not_one": sum(len(terminal.get(s, [])) != 1 for s in sessions) + len(set(terminal) - sessions),
        "duplicated_chunks": duplicated,
        "misordered_streams": misordered,
        "retries": total_retries,
        "retries_by_reason": dict(sorted(retries.items())),
        "upstream_requests": upstream_requests,
        "attempts_unaccounted": upstream_requests - len(sessions) - total_retries,
        "error_status": error_status,
        "error_event": error_event,
        "other_kinds": {k: v for k, v in sorted(kinds.items()) if k not in ("completed", "error-status", "error-event")},
        "error_codes": dict(sorted(collections.Counter(f"{s.status} {s.code}" for s in seen if s.code).items())),
        "upstream_answers": dict(mix.counts),
        "completion_tokens": totals["completion_tokens"],
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "requests_per_s": round(requests / streamed, 1) if streamed else None,
    }
