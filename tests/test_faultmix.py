"""The fault mix of issue 9, small: 300 streamed requests through a gateway
whose upstream, at set rates, resets, answers 5xx or 429, goes silent or sends
a malformed event (bench/faultmix.py; `python -m bench.reliability` runs
10,000). Each request must complete or end in an error its client can read,
nothing may be left open, the usage ledger must hold what every client was
told, and a retry must never repeat a chunk."""

from __future__ import annotations

import pytest

from bench import faultmix
from streamvisor.testing import start_server

SCRIPTED = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[plugins.usage]
retention_seconds = 3600
"""


@pytest.fixture(scope="module")
def mix():
    return faultmix.run(requests=300, concurrency=24)


def test_every_request_completes_or_ends_in_an_error_the_client_can_read(mix):
    assert mix["other"] == 0, mix["other_kinds"]
    assert mix["completed"] + mix["terminal_errors"] == mix["requests"] == 300
    # Retries hide most upstream faults; what is left reaches the clients
    # as errors, mostly after the first chunk (never retried).
    assert mix["completed"] >= 0.7 * mix["requests"], mix
    assert mix["error_event"] > 0, mix


def test_no_session_and_no_upstream_connection_is_left_behind(mix):
    assert mix["live_sessions_after"] == 0
    assert mix["upstream_open_beyond_pool"] == 0
    assert mix["upstream_open_after_stop"] == 0
    assert mix["terminal_events_not_one"] == 0


def test_the_usage_ledger_holds_what_every_client_was_told(mix):
    assert mix["usage_mismatches"] == 0  # completed: the usage chunk is the recorded usage
    assert mix["partial_usage_mismatches"] == 0  # failed midway: exactly the words sent
    assert mix["ledger_mismatches"] == 0  # every session, with its tokens and outcome
    assert mix["failed_not_in_ledger"] == 0
    assert mix["ledger_totals_diff"] == 0  # GET /v1/usage sums to the terminal events
    assert mix["completion_tokens"] > 0


def test_retries_happen_and_never_duplicate_a_chunk(mix):
    assert set(mix["retries_by_reason"]) == {"connect", "rate_limit", "server_error", "timeout"}, mix["retries_by_reason"]
    # Every attempt the upstream saw is a session's first or an announced retry.
    assert mix["attempts_unaccounted"] == 0
    assert mix["duplicated_chunks"] == 0
    assert mix["misordered_streams"] == 0


def test_a_duplicated_chunk_would_be_seen():
    words = [f"w{i}/7" for i in range(faultmix.WORDS)]
    assert faultmix.word_faults(words, completed=True) == (False, False)
    assert faultmix.word_faults(["w0/7", "w1/7", "w1/7"], completed=False)[0]  # a chunk sent twice
    assert faultmix.word_faults(["w0/7", "w0/8", "w1/8"], completed=False)[0]  # two attempts' words
    assert faultmix.word_faults(words[:-1], completed=True)[1]  # completed without its last word


def test_the_ledger_is_read_whole_past_the_routes_page_limit():
    with start_server(SCRIPTED, log_level="error") as server:
        http = server.http()
        for _ in range(30):
            assert http.post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "go"}]}).status_code == 200
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        assert len({r["session_id"] for r in faultmix.ledger_records(http)}) == 30
        # Pages of 7: windows that come back full are split until none is.
        paged = faultmix.ledger_records(http, limit=7)
        assert len(paged) == len({r["session_id"] for r in paged}) == 30
