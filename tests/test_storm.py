"""The disconnect storm of issue 9, small: 100 clients go away before the
headers, after the first chunk, mid-stream and during a retry's backoff
(bench/storm.py; `python -m bench.reliability` runs 1,000 against a gateway in
its own process). Every upstream connection they caused must be closed, soon;
no retry may follow a client that left; every dropped stream must be in the
usage ledger as disconnected, a cut one with its exact partial usage."""

from __future__ import annotations

import json
import socket
import time

import pytest

from bench import storm
from streamvisor.testing import FakeUpstream, Reply, completion_events

CLIENTS = 100
PER_KIND = CLIENTS // len(storm.KINDS)


@pytest.fixture(scope="module")
def result():
    # In this process: the fast test's gateway is a ServerThread, so its RSS
    # is the test process's, and its timings share one GIL with the clients.
    return storm.run(clients=CLIENTS, process=False)


def test_every_client_drops_as_planned(result):
    assert result["dropped"] == CLIENTS and result["client_errors"] == 0
    assert result["dropped_by_kind"] == {kind: PER_KIND for kind in storm.KINDS}
    assert result["misplanned"] == 0


def test_every_upstream_connection_of_a_dropped_client_is_closed_soon(result):
    # One upstream request per client: none was retried after it left.
    assert result["upstream_connections"] == CLIENTS
    assert result["upstream_not_closed"] == 0
    assert result["upstream_open_after"] == 0
    # Timed for the three kinds that had a connection open when they left.
    assert result["close_ms"]["n"] >= 3 * PER_KIND
    assert set(result["close_ms_by_kind"]) >= {"before_headers", "after_first_chunk", "mid_stream"}
    # Loose: the clients, the fake upstream and the gateway share this process.
    assert result["close_ms_max"] < 1000, result["close_ms"]


def test_a_client_that_leaves_during_the_backoff_gets_no_retry(result):
    assert result["retries_after_drop"] == 0
    # Most left once the 503 was in and the gateway was waiting to retry.
    assert result["during_backoff_confirmed"] >= PER_KIND * 0.6, result
    assert result["during_backoff_confirmed"] <= result["retries"] <= PER_KIND


def test_every_dropped_stream_is_in_the_ledger_with_its_partial_usage(result):
    assert result["not_in_ledger"] == 0
    assert result["ledger_not_disconnected"] == 0
    assert result["partial_usage_wrong"] == 0
    assert result["completion_tokens"] >= 2 * PER_KIND  # every cut stream had at least one chunk


def test_nothing_is_left_live_and_memory_is_given_back(result):
    assert result["live_sessions_after"] == 0
    # In-process, the RSS is the whole test process's: a loose bound (the full
    # run measures a gateway process of its own against 5 %).
    assert result["rss_growth_pct"] < 15, result


def test_the_fake_upstream_times_a_client_that_leaves_mid_answer():
    """The storm's clock: the fake records the moment its client closed, not
    the moment its next write failed."""
    with FakeUpstream() as upstream:
        upstream.reply(Reply(chunks=completion_events("a b c d e f g h"), chunk_delay=0.5))
        body = json.dumps({"model": "m1", "user": "me", "messages": []}).encode()
        with socket.create_connection(("127.0.0.1", upstream.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"data:" not in received:  # the headers, then the first chunk
                received += client.recv(4096)
            time.sleep(0.1)
            left = time.monotonic()
        assert upstream.wait_closed(2)
        (record,) = upstream.connection_log
        assert record.cut and record.requests == [json.loads(body)]
        assert 0 <= record.closed - left < 0.1  # well before the next chunk was due
