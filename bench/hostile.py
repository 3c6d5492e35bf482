"""Hostile upstreams: twelve ways an OpenAI-compatible upstream can misbehave,
each of which must end, within the configured timeouts, in an error the client
can read (a 5xx envelope before the first chunk, a terminal error event after
it), with no session left live and no upstream connection left open.

Owns: the twelve `Reply`s of `streamvisor.testing.FakeUpstream` (`CASES`), the
gateway config they run behind (`gateway_toml`), and `run_case`, which sends
requests through a gateway and classifies what each client saw.
`tests/test_reliability.py` runs each case once (and the 39 MB event a few
times, watching memory); `python -m bench.reliability` runs each a hundred times
against a separate server process and reports its memory.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import time
from typing import Any, Callable

import attrs
import httpx

from streamvisor.testing import Reply, completion_events, sse

#: The upstream's timeouts in the gateway under test: short, so that the
#: silent cases end quickly.
READ_TIMEOUT = 1.0
EVENT_TIMEOUT = 2.0


def _chunk(content: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "model": "m1", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


_TWO = sse(_chunk("Hello"), _chunk(" there"))
_BIG = b"data: " + b"x" * 65_535 + b"\n"

#: name -> (what the upstream does, the Reply).
CASES: dict[str, tuple[str, Callable[[], Reply]]] = {
    "never-ending event": (
        "one event whose data lines never end: 39 MB, no blank line, then close",
        lambda: Reply(chunks=(_BIG,) * 600),
    ),
    "never-ending line": (
        "one line of 39 MB without a newline, then close",
        lambda: Reply(chunks=(b"data: " + b"y" * 65_530,) + (b"y" * 65_536,) * 599),
    ),
    "invalid JSON": ("a data line that is not JSON", lambda: Reply(chunks=_TWO + sse("{not json"))),
    "wrong shape": (
        "valid JSON of the wrong shape (choices is a string, then a delta that is a list)",
        lambda: Reply(chunks=_TWO + sse({"choices": "none"}) + sse({"choices": [{"delta": ["x"]}]})),
    ),
    "silence after headers": ("200 and headers, then nothing", lambda: Reply(chunks=_TWO, hang_after=0)),
    "silence mid-stream": ("two chunks, then nothing", lambda: Reply(chunks=_TWO + sse(_chunk("!")), hang_after=2)),
    "reset mid-stream": ("two chunks, then a TCP reset", lambda: Reply(chunks=_TWO + sse(_chunk("!")), reset_after=2)),
    "no [DONE]": ("two chunks and a clean end, without finish_reason or [DONE]", lambda: Reply(chunks=_TWO)),
    "HTML 200": (
        "200 with an HTML page",
        lambda: Reply(200, {"Content-Type": "text/html; charset=utf-8"}, b"<html><body><h1>Welcome to nginx!</h1></body></html>"),
    ),
    "gzip without header": (
        "a gzip-compressed stream without Content-Encoding",
        lambda: Reply(chunks=(gzip.compress(b"".join(completion_events("gzipped words here"))),)),
    ),
    "10 GB Content-Length": (
        "Content-Length: 10000000000, a few bytes, then nothing",
        lambda: Reply(
            body=b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 10000000000\r\n\r\n" + b"".join(_TWO),
            raw=True,
            hang_after=0,
        ),
    ),
    "slow drip": (
        "a valid stream, one byte a second",
        lambda: Reply(chunks=tuple(bytes([b]) for b in b"".join(completion_events("drip drip drip"))), chunk_delay=1.0),
    ),
}


def gateway_toml(upstream_url: str) -> str:
    """The gateway under test: the openai provider on the hostile upstream,
    without retries (a hostile answer is not worth a second try here), plus
    health, usage and admin to look at it."""
    return f"""
[plugins.openai]
[[plugins.openai.upstreams]]
name = "hostile"
base_url = "{upstream_url}"
models = ["m1"]
connect_timeout = 1
read_timeout = {READ_TIMEOUT}
event_timeout = {EVENT_TIMEOUT}

[plugins.usage]
[plugins.health]
[plugins.admin]
"""


@attrs.define
class Outcome:
    #: "error-status": a 4xx/5xx envelope before any chunk; "error-event": a
    #: terminal error event after chunks; "completed": [DONE] (wrong here);
    #: "cut": the response ended with neither (wrong); "client-timeout" (wrong).
    kind: str
    status: int
    seconds: float
    code: str | None = None


def one_request(base_url: str, timeout: float = 30.0) -> Outcome:
    """One streamed completion; how it ended."""
    t0 = time.perf_counter()
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    try:
        with httpx.Client(timeout=timeout) as client, client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                data = json.loads(response.read())
                return Outcome("error-status", response.status_code, time.perf_counter() - t0, data["error"]["code"])
            last = None
            for line in response.iter_lines():
                if line.startswith("data: "):
                    last = line[6:]
                    if last != "[DONE]":
                        event = json.loads(last)
                        if "error" in event:
                            return Outcome("error-event", response.status_code, time.perf_counter() - t0, event["error"]["code"])
            kind = "completed" if last == "[DONE]" else "cut"
            return Outcome(kind, response.status_code, time.perf_counter() - t0)
    except httpx.TimeoutException:
        return Outcome("client-timeout", 0, time.perf_counter() - t0)


def run_case(base_url: str, requests: int, concurrency: int = 20) -> list[Outcome]:
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, requests)) as pool:
        return list(pool.map(lambda _: one_request(base_url), range(requests)))


def acceptable(outcome: Outcome) -> bool:
    """An end the client can read: an error envelope (5xx) or a terminal error event."""
    return (outcome.kind == "error-status" and outcome.status >= 500) or outcome.kind == "error-event"


#: The longest a request of each case may take: the timeouts it should end by,
#: plus scheduling slack.
def deadline(name: str) -> float:
    return {"slow drip": EVENT_TIMEOUT + 2.5}.get(name, READ_TIMEOUT + 2.5)
