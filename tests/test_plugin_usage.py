"""The usage plugin against real servers: the ledger matches what clients saw,
partial usage of stopped, disconnected and failed streams is kept, records fold
into aggregates without changing a total, and no session is missing even when
its terminal events arrive faster than a listener's queue holds.

`tests/test_plugin_reasoning.py` shares the providers defined here."""

from __future__ import annotations

import time

import openai
import pytest
import trio

from streamvisor.hooks import Delta, ModelInfo, Principal, Usage, bearer_token, hookimpl
from streamvisor.plugins.usage import Filters, Ledger, UsageRecord

from .conftest import SCRIPTED, start_server

THINKING = """
[[plugins.scripted.models]]
name = "thinker"
text = "<think>let me see</think>The answer is 4."

[[plugins.scripted.models]]
name = "reasoner"
reasoning = "hmm, four"
text = "Four."
"""

#: Chunks a provider may send: a tag split across chunks, text after it.
SPLIT_THINK = ["<thi", "nk>let me", " see</th", "ink>The answer", " is 4."]
#: Things that look like the start of a tag but are not one, and a "<" at the end.
NOT_TAGS = ["2 <", " 3 and a <b>bold</b> <thin", "k about it x <"]


class ChunkProvider:
    """Streams fixed chunks: with one token of usage per chunk, or none."""

    name = "chunky"
    models = {
        "split-think": (SPLIT_THINK, True, 0.0),
        "not-tags": (NOT_TAGS, True, 0.0),
        "mute": (["Hello", " there", " friend"], False, 0.0),
        "mute-slow": (["word "] * 500, False, 0.02),
    }

    async def list_models(self):
        return [ModelInfo(name, owned_by="chunky") for name in self.models]

    async def stream(self, request):
        chunks, with_usage, delay = self.models[request.model]
        for sent, chunk in enumerate(chunks, start=1):
            if delay and sent > 1:
                await trio.sleep(delay)
            yield Delta(content=chunk, usage=Usage(2, sent) if with_usage else None)
        yield Delta(finish_reason="stop")


class ChunkPlugin:
    @hookimpl
    def register_providers(self, register):
        register(ChunkProvider())


def _toml(usage_settings: str = "", scripted_extra: str = THINKING, reasoning: str = "[plugins.reasoning]\n") -> str:
    return SCRIPTED + scripted_extra + "\n[plugins.chunky]\n\n" + reasoning + "\n[plugins.usage]\n" + usage_settings


def _server(usage_settings: str = "", reasoning: str = "[plugins.reasoning]\n", **server_settings):
    return start_server(_toml(usage_settings, reasoning=reasoning), plugins={"chunky": ChunkPlugin}, **server_settings)


def _plugin(server):
    # The test reaches into the runtime for the plugin object; plugins cannot.
    return server.runtime._host.plugins["usage"].plugin


def _wait_recorded(server, count: int) -> None:
    plugin = _plugin(server)
    server.wait_for(lambda: plugin.ledger.recorded >= count)


def _usage(server, **params):
    with server.http() as http:
        response = http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _record(server, session_id: str):
    with server.http() as http:
        records = http.get("/v1/usage/sessions", params={"limit": 1000}).json()["data"]
    matches = [r for r in records if r["session_id"] == session_id]
    assert len(matches) == 1, f"{session_id} not in the ledger"
    return matches[0]


def _session_id(chunk) -> str:
    return "sess_" + chunk.id.removeprefix("chatcmpl-")


def _ask(client, model, content="one two three", stream=False):
    """One completion; returns the usage the client saw."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        return client.chat.completions.create(model=model, messages=messages).usage
    usage = None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
    return usage


def _sum(usages):
    return {
        "prompt_tokens": sum(u.prompt_tokens for u in usages),
        "completion_tokens": sum(u.completion_tokens for u in usages),
        "total_tokens": sum(u.total_tokens for u in usages),
    }


def _tokens(tally):
    return {k: tally[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_totals_match_the_usage_clients_saw_with_breakdowns():
    with _server() as server:
        client = server.openai()
        seen = {"fox": [], "echo": [], "reasoner": []}
        for i in range(3):
            seen["fox"].append(_ask(client, "fox", stream=bool(i % 2)))
            seen["echo"].append(_ask(client, "echo", "a b c d e f"[: 2 * i + 1], stream=bool(i % 2)))
        seen["reasoner"].append(_ask(client, "reasoner", stream=True))
        _wait_recorded(server, 7)
        body = _usage(server)
        everything = [u for usages in seen.values() for u in usages]
        assert _tokens(body["totals"]) == _sum(everything)
        assert body["totals"]["sessions"] == 7
        assert body["totals"]["exact"] is True
        assert body["totals"]["outcomes"]["completed"] == 7
        assert body["totals"]["duration_ms"] > 0
        # The provider's own reasoning count is kept.
        assert body["totals"]["reasoning_tokens"] == seen["reasoner"][0].completion_tokens_details.reasoning_tokens == 2
        for model, usages in seen.items():
            assert _tokens(body["by_model"][model]) == _sum(usages)
            assert body["by_model"][model]["sessions"] == len(usages)
        assert _tokens(body["by_provider"]["scripted"]) == _sum(everything)
        assert _tokens(body["by_identity"]["anonymous"]) == _sum(everything)
        # The totals() method is the route's body.
        totals = server.call(lambda: _plugin(server).totals())
        assert totals["totals"] == body["totals"]
        # Filters by model, provider and identity.
        fox = _usage(server, model="fox")
        assert _tokens(fox["totals"]) == _sum(seen["fox"]) and list(fox["by_model"]) == ["fox"]
        assert _usage(server, provider="chunky")["totals"]["sessions"] == 0
        assert _usage(server, identity="anonymous")["totals"]["sessions"] == 7
        assert _usage(server, identity="someone-else")["totals"]["sessions"] == 0


def test_time_window_filters():
    with _server() as server:
        client = server.openai()
        before = time.time()
        first = _ask(client, "fox")
        _wait_recorded(server, 1)
        middle = time.time()
        second = _ask(client, "echo", "a b")
        _wait_recorded(server, 2)
        after = time.time()

        assert _tokens(_usage(server, since=before)["totals"]) == _sum([first, second])
        assert _tokens(_usage(server, until=middle)["totals"]) == _sum([first])
        assert _tokens(_usage(server, since=middle)["totals"]) == _sum([second])
        assert _tokens(_usage(server, since=middle, until=after)["totals"]) == _sum([second])
        assert _usage(server, since=after + 1)["totals"]["sessions"] == 0
        assert _usage(server, since=before, model="fox")["totals"]["sessions"] == 1
        assert _usage(server, since=middle, model="fox")["totals"]["sessions"] == 0


BAD_QUERIES = [
    ({"since": "yesterday"}, "since"),
    ({"until": "-5"}, "until"),
    ({"since": "nan"}, "since"),
    ({"until": "1e999"}, "until"),
    ({"since": "200", "until": "100"}, "until"),
    ({"model": ""}, "model"),
    ({"modle": "fox"}, "modle"),
    ({"model": ["fox", "echo"]}, "model"),
]


def test_bad_query_values_are_400_naming_the_param():
    with _server() as server, server.http() as http:
        for params, param in BAD_QUERIES:
            response = http.get("/v1/usage", params=params)
            assert response.status_code == 400, params
            body = response.json()
            assert body["error"]["param"] == param
            assert body["error"]["type"] == "invalid_request_error"
            assert param in body["error"]["message"] and body["request_id"]
        listing = http.get("/v1/usage/sessions", params={"limit": "0"})
        assert listing.status_code == 400 and listing.json()["error"]["param"] == "limit"
        assert http.get("/v1/usage", params={"since": "1700000000.5", "model": "fox"}).status_code == 200


def test_stopped_disconnected_and_failed_streams_keep_partial_usage():
    with _server() as server:
        client = server.openai()
        messages = [{"role": "user", "content": "go"}]

        # Stopped by POST /v1/sessions/{id}/stop after a few chunks.
        stream = client.chat.completions.create(model="slow", messages=messages, stream=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                with server.http() as http:
                    assert http.post(f"/v1/sessions/{_session_id(chunk)}/stop").json()["stopped"] is True
        assert chunks[-1].choices[0].finish_reason == "stopped"
        stopped_id = _session_id(chunks[0])

        # Disconnected: the client goes away mid-stream.
        stream = client.chat.completions.create(model="slow", messages=messages, stream=True)
        for count, chunk in enumerate(stream, start=1):
            if count == 3:
                break
        stream.close()
        disconnected_id = _session_id(chunk)

        # Failed midway: the scripted provider fails after three chunks.
        stream = client.chat.completions.create(model="breaks-midway", messages=messages, stream=True)
        got = []
        with pytest.raises(openai.APIError):
            for chunk in stream:
                got.append(chunk)
        failed_id = _session_id(got[0])

        # Stopped, from a provider that gives no counts: the core's estimate.
        stream = client.chat.completions.create(model="mute-slow", messages=messages, stream=True)
        for count, chunk in enumerate(stream, start=1):
            if count == 3:
                with server.http() as http:
                    http.post(f"/v1/sessions/{_session_id(chunk)}/stop")
        estimated_id = _session_id(chunk)

        _wait_recorded(server, 4)
        stopped = _record(server, stopped_id)
        assert stopped["outcome"] == "stopped" and stopped["exact"] is True
        assert stopped["completion_tokens"] >= 3 and stopped["total_tokens"] > stopped["completion_tokens"]
        disconnected = _record(server, disconnected_id)
        assert disconnected["outcome"] == "disconnected" and disconnected["completion_tokens"] >= 3
        failed = _record(server, failed_id)
        assert failed["outcome"] == "failed" and failed["completion_tokens"] == 3 and failed["exact"] is True
        estimated = _record(server, estimated_id)
        assert estimated["outcome"] == "stopped" and estimated["exact"] is False and estimated["completion_tokens"] > 0
        for record in (stopped, disconnected, failed, estimated):
            assert record["duration_ms"] > 0

        body = _usage(server)
        assert body["totals"]["outcomes"] == {"completed": 0, "failed": 1, "stopped": 2, "disconnected": 1}
        assert body["totals"]["exact"] is False and body["totals"]["estimated_sessions"] == 1
        assert body["totals"]["completion_tokens"] == sum(
            r["completion_tokens"] for r in (stopped, disconnected, failed, estimated)
        )
        assert _usage(server, model="slow")["totals"]["exact"] is True
        assert _usage(server, provider="chunky")["totals"]["exact"] is False


def test_records_fold_after_retention_and_totals_stay_identical():
    with _server("retention_seconds = 0.2\nbucket_seconds = 60\n") as server:
        client = server.openai()
        start = time.time()
        seen = [_ask(client, "fox"), _ask(client, "echo", "a b c", stream=True), _ask(client, "thinker")]
        _wait_recorded(server, 3)
        before = _usage(server)
        plugin = _plugin(server)
        server.wait_for(lambda: not plugin.ledger.records, timeout=10)
        after = _usage(server)
        assert after["ledger"]["records"] == 0 and after["ledger"]["folded_sessions"] == 3
        assert after["ledger"]["buckets"] >= 1
        assert _tokens(after["totals"]) == _sum(seen)
        for key in ("totals", "by_model", "by_provider", "by_identity"):
            assert after[key] == before[key]
        assert after["totals"]["reasoning_tokens"] == 3
        # Time windows still work at bucket resolution (the minute they fell in).
        bucket_start = int(start // 60) * 60
        assert _usage(server, since=bucket_start)["totals"] == after["totals"]
        assert _usage(server, since=bucket_start + 120)["totals"]["sessions"] == 0
        assert _usage(server, until=bucket_start)["totals"]["sessions"] == 0
        assert _usage(server, model="echo")["totals"]["sessions"] == 1


def test_max_records_folds_the_oldest_early():
    with _server("retention_seconds = 3600\nmax_records = 2\n") as server:
        client = server.openai()
        seen = []
        for _ in range(5):
            seen.append(_ask(client, "fox"))
        seen.append(_ask(client, "echo", "x y"))
        _wait_recorded(server, 6)
        body = _usage(server)
        assert body["ledger"]["records"] == 2 and body["ledger"]["folded_sessions"] == 4
        assert _tokens(body["totals"]) == _sum(seen)
        assert _tokens(body["by_model"]["fox"]) == _sum(seen[:5])
        with server.http() as http:
            listed = http.get("/v1/usage/sessions").json()["data"]
        assert [r["model"] for r in listed] == ["echo", "fox"]  # newest first
        assert listed[0]["total_tokens"] == seen[-1].total_tokens


def _record_at(finished_at, model="m", tokens=10):
    return UsageRecord(
        session_id=f"sess_{finished_at}", request_id="", model=model, provider="p", identity="anonymous",
        outcome="completed", finished_at=finished_at, prompt_tokens=tokens, completion_tokens=tokens,
        reasoning_tokens=0, duration_ms=1.0, first_token_ms=0.5, exact=True,
    )


def test_buckets_past_max_buckets_fold_into_time_less_history():
    ledger = Ledger(retention=0, max_records=10, bucket_seconds=60, max_buckets=2)
    for at in (1000.0, 1070.0, 1130.0, 1190.0):  # buckets 960, 1020, 1080, 1140
        ledger.add(_record_at(at), now=0)
    assert not ledger.records and sorted(ledger.buckets) == [1080, 1140]
    assert ledger.history_until == 1080
    everything = ledger.query(Filters())
    assert everything["totals"]["sessions"] == 4 and everything["complete"] is True
    recent = ledger.query(Filters(since=1080))
    assert recent["totals"]["sessions"] == 2 and recent["complete"] is True
    # A window reaching into the time-less part cannot be answered completely.
    older = ledger.query(Filters(since=1000))
    assert older["totals"]["sessions"] == 2 and older["complete"] is False
    # A late record whose bucket was already folded away goes to history.
    ledger.add(_record_at(900.0), now=0)
    assert ledger.query(Filters())["totals"]["sessions"] == 5 and len(ledger.buckets) == 2


def test_terminal_events_are_never_dropped_even_past_the_listener_queue():
    # Four sessions stopped at the same moment conclude in one scheduler batch:
    # their four terminal events reach a listener queue of one before the
    # listener runs. Other events would be dropped; terminal ones never are.
    with _server(event_queue_size=1) as server:
        client = server.openai()
        streams = [
            client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go"}], stream=True)
            for _ in range(4)
        ]
        for stream in streams:
            next(iter(stream))
        runtime = server.runtime
        server.call(lambda: [s.cancel("stopped") for s in runtime.sessions.live()])
        for stream in streams:
            for _ in stream:
                pass
        plugin = _plugin(server)
        server.wait_for(lambda: plugin.ledger.recorded >= 4, timeout=10)
        stats = {s.plugin: s for s in server.call(lambda: runtime.events.stats)}
        assert stats["usage"].dropped == 0 and stats["usage"].delivered == 4
        body = _usage(server)
        assert body["totals"]["sessions"] == 4
        assert body["totals"]["outcomes"]["stopped"] == 4
        assert body["totals"]["completion_tokens"] >= 4  # partial usage, never zero


# -- who sees what ------------------------------------------------------------------------

#: Bearer tokens and whose they are: two members of team red, one of blue, red's admin.
PRINCIPALS = {
    "tok-alice": Principal(identity="alice", team="red"),
    "tok-bob": Principal(identity="bob", team="red"),
    "tok-carol": Principal(identity="carol", team="blue"),
    "tok-rita": Principal(identity="rita", team="red", role="team_admin"),
}
ADMIN_KEY = "usage-test-admin-key"


class TokenAuth:
    """Authenticates `PRINCIPALS`' bearer tokens (a stand-in for API keys)."""

    @hookimpl
    def register_authenticators(self, register):
        def authenticate(headers, path):
            return PRINCIPALS.get(bearer_token(headers) or "")

        register(authenticate)


def _as(server, token):
    return server.http(headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("ledger", ["memory", "store"])
def test_a_member_sees_its_own_usage_and_a_team_admin_its_teams(ledger, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMVISOR_ADMIN_KEY", ADMIN_KEY)
    store = f'[plugins.store]\nurl = "sqlite:///{tmp_path}/usage.db"\n' if ledger == "store" else ""
    toml = SCRIPTED + "\n[plugins.auth]\n" + store + "\n[plugins.usage]\n"
    with start_server(toml, plugins={"auth": TokenAuth}) as server:
        for token in ("tok-alice", "tok-bob", "tok-carol"):
            client = server.openai(api_key=token)
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "hi"}])
        admin = _as(server, ADMIN_KEY)

        def recorded():
            body = admin.get("/v1/usage").json()
            return body["totals"]["sessions"] == 3 and len(admin.get("/v1/usage/sessions").json()["data"]) == 3

        deadline = time.monotonic() + 10
        while not recorded():
            assert time.monotonic() < deadline, "the sessions were not recorded"
            time.sleep(0.02)

        def usage(token, **params):
            response = _as(server, token).get("/v1/usage", params=params)
            assert response.status_code == 200, response.text
            return response.json()

        def records(token, **params):
            response = _as(server, token).get("/v1/usage/sessions", params=params)
            assert response.status_code == 200, response.text
            return sorted((r["identity"], r["team"]) for r in response.json()["data"])

        # The admin sees everything, and may filter by team.
        assert usage(ADMIN_KEY)["totals"]["sessions"] == 3
        assert sorted(usage(ADMIN_KEY, team="red")["by_identity"]) == ["alice", "bob"]
        assert records(ADMIN_KEY, team="blue") == [("carol", "blue")]
        # A member sees its own usage; asking for another's answers nothing, not an error.
        alice = usage("tok-alice")
        assert alice["totals"]["sessions"] == 1 and list(alice["by_identity"]) == ["alice"]
        assert alice["filters"]["identity"] == "alice"
        assert usage("tok-alice", identity="bob")["totals"]["sessions"] == 0
        assert usage("tok-alice", identity="bob")["by_identity"] == {}
        assert records("tok-alice") == [("alice", "red")]
        assert records("tok-alice", identity="bob") == []
        # The ledger's own counts are the whole server's traffic: not for a member.
        assert "recorded_sessions" not in usage("tok-alice")["ledger"]
        # A team admin sees its team's, and only its team's.
        rita = usage("tok-rita")
        assert rita["totals"]["sessions"] == 2 and sorted(rita["by_identity"]) == ["alice", "bob"]
        assert rita["filters"]["team"] == "red"
        assert usage("tok-rita", identity="bob")["totals"]["sessions"] == 1
        assert usage("tok-rita", identity="carol")["totals"]["sessions"] == 0
        assert usage("tok-rita", team="blue")["totals"]["sessions"] == 0
        assert records("tok-rita") == [("alice", "red"), ("bob", "red")]
        assert records("tok-rita", team="blue") == []
        # Without a credential there is no usage at all.
        with server.http() as http:
            assert http.get("/v1/usage").status_code == 401
