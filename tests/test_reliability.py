"""The fast subset of the reliability suite (issue 9; the full run is
`python -m bench.reliability`): each hostile upstream once, and the upstream
that once grew the server's memory by 50 MB a request, several times."""

from __future__ import annotations

import gc

import pytest

from bench import hostile
from streamvisor.testing import FakeUpstream

from .conftest import start_server


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("name", list(hostile.CASES))
def test_a_hostile_upstream_ends_in_an_error_the_client_can_read(name):
    _, make = hostile.CASES[name]
    with FakeUpstream() as upstream:
        upstream.reply(make())
        with start_server(hostile.gateway_toml(upstream.url), shutdown_grace_seconds=1) as server:
            outcome = hostile.one_request(server.url)
            assert hostile.acceptable(outcome), outcome
            assert outcome.seconds < hostile.deadline(name), outcome
            assert outcome.code in ("upstream_error", "upstream_timeout"), outcome
            server.wait_for(lambda: server.runtime.sessions.live_count == 0, timeout=5)
            assert upstream.wait_closed(5), f"{upstream.open_connections} upstream connections left open"
            records = server.http().get("/v1/usage/sessions").json()["data"]
            assert [r["outcome"] for r in records] == ["failed"]


def test_a_never_ending_event_neither_grows_memory_nor_stays_in_a_failed_session():
    _, make = hostile.CASES["never-ending event"]
    with FakeUpstream() as upstream:
        upstream.reply(make())
        with start_server(hostile.gateway_toml(upstream.url), session_retention_seconds=600) as server:
            assert hostile.acceptable(hostile.one_request(server.url))  # warm-up
            gc.collect()
            before = _rss_mb()
            outcomes = [hostile.one_request(server.url) for _ in range(5)]
            server.wait_for(lambda: server.runtime.sessions.live_count == 0)
            gc.collect()
            grown = _rss_mb() - before
            failed = server.call(lambda: [s for s in server.runtime.sessions.retained() if s.state == "failed"])
    assert all(o.code == "upstream_error" for o in outcomes), outcomes
    # Each request used to add ~50 MB that was never given back.
    assert grown < 25, f"RSS grew {grown:.1f} MB over 5 requests"
    assert len(failed) == 6
    for session in failed:
        # A failed session keeps its error without the traceback that held the
        # provider's frames (and the decoder's buffers).
        assert session.error.__traceback__ is None and session.error.__cause__ is None
        assert "max_event_bytes" in session.error.message
