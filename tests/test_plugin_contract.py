"""The hook contract from a plugin's side: observation, middleware, transformers,
sync and async hooks, and plugins.toml order."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import time
import weakref

import attrs
import openai
import pytest
import trio

from streamvisor.core.body import WINDOW
from streamvisor.hooks import APIError, Delta, StreamvisorDeprecationWarning, body_chunks, hookimpl, listens_to, read_json

from .conftest import SCRIPTED, start_server


def _stream_payloads(server, model="fox"):
    """The chunk objects of one streamed completion, minus the per-request ids."""
    with server.http() as http:
        body = http.post(
            "/v1/chat/completions",
            json={"model": model, "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "go"}]},
        ).text
    events = [e for e in body.split("\n\n") if e]
    out = []
    for event in events:
        lines = event.splitlines()
        data = lines[-1].removeprefix("data: ")
        if data == "[DONE]":
            out.append(data)
            continue
        chunk = json.loads(data)
        chunk.pop("id"), chunk.pop("created")
        out.append((lines[0], chunk))
    return out


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def on_event(self, event):
        self.events.append(event)


class Raiser:
    @hookimpl
    def on_event(self, event):
        raise RuntimeError(f"listener bug on {event.type}")


class AsyncRaiser:
    @hookimpl
    async def on_event(self, event):
        await trio.sleep(0)
        raise ValueError("async listener bug")


class Hanger:
    @hookimpl
    async def on_event(self, event):
        await trio.sleep_forever()


def test_listeners_that_raise_or_hang_leave_streams_byte_identical():
    with start_server(SCRIPTED) as plain:
        expected = _stream_payloads(plain)
    toml = SCRIPTED + "\n[plugins.raiser]\n[plugins.async-raiser]\n[plugins.hanger]\n"
    plugins = {"raiser": Raiser(), "async-raiser": AsyncRaiser(), "hanger": Hanger()}
    with start_server(toml, plugins=plugins, event_queue_size=4) as server:
        for _ in range(3):
            assert _stream_payloads(server) == expected
        reply = server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        assert reply.choices[0].message.content == "The quick brown fox jumps over the lazy dog."
        stats = {s.plugin: s for s in server.call(lambda: server.runtime.events.stats)}
    assert stats["raiser"].errors > 10 and stats["raiser"].delivered == 0
    assert stats["async-raiser"].errors > 10
    assert stats["hanger"].dropped > 10  # its queue of 4 filled up; drops are counted
    assert stats["hanger"].errors == 0


def test_events_follow_the_session_life_cycle():
    recorder = Recorder()
    with start_server(SCRIPTED + "\n[plugins.recorder]\n", plugins={"recorder": recorder}) as server:
        client = server.openai()
        client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        try:
            client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "go"}])
        except Exception:
            pass
        server.wait_for(lambda: sum(e.type in ("completed", "failed") for e in recorder.events) == 2)
    by_session = {}
    for event in recorder.events:
        by_session.setdefault(event.session_id, []).append(event)
    completed, failed = sorted(by_session.values(), key=lambda evs: evs[-1].type)
    types = [e.type for e in completed]
    assert types[:3] == ["created", "started", "first_token"]
    assert types.count("chunk") == 10  # nine words and the finish chunk
    assert types[-1] == "completed"
    assert completed[-1].usage.completion_tokens == 9 and completed[-1].usage.exact
    assert completed[-1].outcome.finish_reason == "stop" and completed[-1].outcome.chunks == 10
    assert completed[-1].model == "fox" and completed[-1].provider == "scripted"
    assert completed[0].request_id
    assert [e.type for e in failed] == ["created", "started", "failed"]
    assert "scripted failure" in failed[-1].outcome.error and failed[-1].outcome.error_code == "upstream_error"


def _tag(tag):
    async def middleware(request, call_next, session):
        yield Delta(content=f"<{tag}>")
        async for delta in call_next(request):
            if delta.finish_reason:
                yield Delta(content=f"</{tag}>")
            yield delta

    return middleware


class Tagger:
    def __init__(self, tag):
        self.tag = tag

    @hookimpl
    def register_middleware(self, register):
        register(_tag(self.tag))


class AsyncShouter:
    """An async registration hook and a chunk transformer."""

    @hookimpl
    async def register_chunk_transformers(self, register):
        await trio.sleep(0)

        def shout(delta):
            if delta.content and "fox" in delta.content:
                return None  # dropped
            return attrs.evolve(delta, content=delta.content.upper()) if delta.content else delta

        register(lambda session: shout)


def test_middleware_composes_in_plugins_toml_order_and_transformers_apply():
    toml = SCRIPTED + "\n[plugins.outer]\n[plugins.inner]\n[plugins.shouter]\n"
    plugins = {"outer": Tagger("a"), "inner": Tagger("b"), "shouter": AsyncShouter()}
    with start_server(toml, plugins=plugins) as server:
        reply = server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
    assert reply.choices[0].message.content == "<A><B>THE QUICK BROWN JUMPS OVER THE LAZY DOG.</B></A>"


class Lifecycle:
    def __init__(self):
        self.calls = []

    @hookimpl
    async def startup(self, runtime):
        await trio.sleep(0)
        self.calls.append(("startup", sorted(p.name for p in runtime.providers)))

    @hookimpl
    def shutdown(self, runtime):
        self.calls.append(("shutdown", runtime.sessions.live_count))


def test_lifecycle_hooks_run_once_each_sync_or_async():
    plugin = Lifecycle()
    with start_server(SCRIPTED + "\n[plugins.life]\n", plugins={"life": plugin}):
        assert plugin.calls == [("startup", ["scripted"])]
    assert plugin.calls == [("startup", ["scripted"]), ("shutdown", 0)]


class Misspelled:
    @hookimpl
    def register_provider(self, register):  # the hook is register_providers
        pass


class Wrapper:
    @hookimpl(wrapper=True)
    def register_routes(self, register):
        return (yield)


def test_misspelled_hooks_and_wrappers_are_refused_at_start_up():
    import pytest

    from streamvisor.config import ConfigError
    from streamvisor.hooks import PluginHost

    from .conftest import make_config

    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config("[plugins.typo]"), {"typo": Misspelled()})
    assert "plugins.typo" in str(caught.value) and "register_provider" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        PluginHost.from_config(make_config("[plugins.wrap]"), {"wrap": Wrapper()})
    assert "plugins.wrap" in str(caught.value) and "register_middleware" in str(caught.value)


class FailingShutdown:
    @hookimpl
    def shutdown(self, runtime):
        raise RuntimeError("cannot flush")


def test_a_failing_shutdown_hook_does_not_skip_the_others():
    later = Lifecycle()
    toml = SCRIPTED + "\n[plugins.failing]\n[plugins.life]\n"
    with start_server(toml, plugins={"failing": FailingShutdown(), "life": later}):
        pass
    assert ("shutdown", 0) in later.calls


class Fallback:
    """A middleware that sends a failing model's request to another model."""

    @hookimpl
    def register_middleware(self, register):
        async def fallback(request, call_next, session):
            try:
                async for delta in call_next(request):
                    yield delta
            except Exception:
                if request.model != "broken":
                    raise
                async for delta in call_next(attrs.evolve(request, model="echo")):
                    yield delta

        register(fallback)


def test_middleware_can_route_to_another_model():
    with start_server(SCRIPTED + "\n[plugins.fallback]\n", plugins={"fallback": Fallback()}) as server:
        reply = server.openai().chat.completions.create(model="broken", messages=[{"role": "user", "content": "rescued"}])
    assert reply.choices[0].message.content == "rescued"
    assert reply.model == "broken"


class OnlyCompleted:
    def __init__(self):
        self.types = []

    @hookimpl
    @listens_to("completed")
    def on_event(self, event):
        self.types.append(event.type)


def test_a_listener_receives_only_the_types_it_listens_to():
    only = OnlyCompleted()
    everything = Recorder()
    toml = SCRIPTED + "\n[plugins.only]\n[plugins.everything]\n"
    with start_server(toml, plugins={"only": only, "everything": everything}) as server:
        client = server.openai()
        for _ in range(2):
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: len(only.types) == 2 and [e.type for e in everything.events].count("completed") == 2)
        stats = {s.plugin: s for s in server.call(lambda: server.runtime.events.stats)}
    assert only.types == ["completed", "completed"]
    assert stats["only"].delivered == 2  # no chunk event was ever queued for it
    assert "chunk" in {e.type for e in everything.events}


class ListensToNonsense:
    @hookimpl
    @listens_to("complete")
    def on_event(self, event):
        pass


def test_listening_to_an_unknown_event_type_stops_start_up():
    import pytest

    from streamvisor.config import ConfigError

    with pytest.raises(RuntimeError) as caught:
        with start_server("[plugins.typo]", plugins={"typo": ListensToNonsense()}):
            pass
    assert "complete" in repr(caught.value.__cause__) and "ConfigError" in repr(caught.value.__cause__)
    assert ConfigError


# -- contract 1.0: event types, sessions, per-session transformers, faults ------------


class Announcer:
    """Declares an event type and emits it from its middleware, with a header."""

    @hookimpl
    def register_event_types(self, register):
        register("announcer.seen", "a request went by (data: model)")

    @hookimpl
    def register_middleware(self, register):
        async def announce(request, call_next, session):
            assert session.set_header("X-Announced", "yes") is True
            session.emit("announcer.seen", model=request.model)
            self.checks = []
            for bad in (("X-Session-ID", "x"), ("X-Evil", "a\r\nSet-Cookie: x=1"), ("Bad Name", "x"), ("X-Trailing", "a\n"), ("X-Name\n", "a")):
                try:
                    session.set_header(*bad)
                except ValueError as exc:
                    self.checks.append(str(exc))
            for bad_type in ("announcer.typo", "completed"):
                try:
                    session.emit(bad_type)
                except ValueError as exc:
                    self.checks.append(str(exc))
            first = True
            async for delta in call_next(request):
                yield delta
                if first:
                    first = False
                    self.late = session.set_header("X-Too-Late", "1")

        register(announce)


class AnnouncementListener:
    def __init__(self):
        self.seen = []

    @hookimpl
    @listens_to("announcer.seen")
    def on_event(self, event):
        self.seen.append((event.type, dict(event.data)))


def test_a_plugin_declares_an_event_type_emits_it_and_sets_headers_through_its_session():
    announcer, listener = Announcer(), AnnouncementListener()
    toml = SCRIPTED + "\n[plugins.announcer]\n[plugins.listener]\n"
    with start_server(toml, plugins={"announcer": announcer, "listener": listener}) as server:
        raw = server.openai().chat.completions.with_raw_response.create(model="fox", messages=[{"role": "user", "content": "go"}])
        assert raw.headers["X-Announced"] == "yes"
        assert "X-Too-Late" not in raw.headers and announcer.late is False
        server.wait_for(lambda: listener.seen == [("announcer.seen", {"model": "fox"})])
        types = server.runtime.events.types
    assert types["announcer.seen"].owner == "announcer" and not types["announcer.seen"].terminal
    assert types["completed"].owner == "core" and types["completed"].terminal
    reserved, split, name, trailing_value, trailing_name, typo, terminal = announcer.checks
    assert "set by streamvisor itself" in reserved
    assert "without line breaks" in split and "not a valid header name" in name
    assert "without line breaks" in trailing_value and "not a valid header name" in trailing_name
    assert "'announcer.typo' was never declared" in typo
    assert "terminal event" in terminal


class Squatter:
    @hookimpl
    def register_event_types(self, register):
        register("announcer.seen")


def test_an_event_type_declared_twice_stops_start_up_naming_both():
    with pytest.raises(RuntimeError) as caught:
        with start_server("[plugins.announcer]\n[plugins.squatter]\n", plugins={"announcer": Announcer(), "squatter": Squatter()}):
            pass
    message = repr(caught.value.__cause__)
    assert "plugins.squatter" in message and "already declared by plugin 'announcer'" in message


class PerSession:
    """A transformer factory whose per-session state counts that session's chunks."""

    def __init__(self):
        self.states = []

    @hookimpl
    def register_chunk_transformers(self, register):
        register(self.factory)

    def factory(self, session):
        state = _Counted(session.id)
        self.states.append(weakref.ref(state))
        if session.model == "echo":
            return None  # leaves echo sessions alone
        return state.transform


class _Counted:
    def __init__(self, session_id):
        self.session_id = session_id
        self.chunks = 0

    def transform(self, delta):
        self.chunks += 1
        if delta.content:
            return attrs.evolve(delta, content=f"{delta.content}[{self.chunks}]")
        return delta


def test_chunk_transformers_are_made_per_session_and_their_state_ends_with_it():
    plugin = PerSession()
    with start_server(SCRIPTED + "\n[plugins.per]\n", plugins={"per": plugin}) as server:
        client = server.openai()
        replies = [client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}]) for _ in range(2)]
        echoed = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b"}])
        server.wait_for(lambda: server.runtime.sessions.live_count == 0)
        server.call(gc.collect)
        alive = [ref for ref in plugin.states if ref() is not None]
    # Each session counted from 1: its own state.
    for reply in replies:
        assert reply.choices[0].message.content.startswith("The[1] quick[2]")
    assert echoed.choices[0].message.content == "a b"  # the factory left it alone
    assert len(plugin.states) == 3 and alive == [], "no session's transformer state outlives its stream"


class Faulty:
    """A transformer with a bug, and one that refuses a word on purpose."""

    @hookimpl
    def register_chunk_transformers(self, register):
        def buggy(delta):
            if delta.content and "brown" in delta.content:
                raise KeyError("a bug")
            return delta

        def guard(delta):
            if delta.content and "forbidden" in delta.content:
                raise APIError("This answer was refused by the guard.", status=400, code="content_refused")
            return delta

        register(lambda session: buggy)
        register(lambda session: guard)


def test_a_transformer_bug_is_contained_and_counted_and_an_api_error_is_a_verdict():
    with start_server(SCRIPTED) as plain:
        expected = _stream_payloads(plain)
    with start_server(SCRIPTED + "\n[plugins.faulty]\n", plugins={"faulty": Faulty()}) as server:
        for _ in range(2):
            assert _stream_payloads(server) == expected  # byte-identical apart from ids
        with pytest.raises(openai.BadRequestError) as refused:
            server.openai().chat.completions.create(model="echo", messages=[{"role": "user", "content": "say forbidden"}])
        status = server.call(lambda: {p["name"]: p for p in server.runtime.plugin_status()})
    assert refused.value.body["code"] == "content_refused"
    faults = status["faulty"]["faults"]["chunk transformer"]
    assert faults["count"] == 2 and faults["last_error"] == "KeyError: 'a bug'"
    assert status["faulty"]["errors"]["total"] == 2


class Legacy:
    """The unversioned contract's forms: a two-argument middleware and a
    transform(delta, session)."""

    @hookimpl
    def register_middleware(self, register):
        async def old(request, call_next):
            async for delta in call_next(request):
                yield delta

        register(old)

    @hookimpl
    def register_chunk_transformers(self, register):
        def shout(delta, session):
            return attrs.evolve(delta, content=delta.content.upper()) if delta.content else delta

        register(shout)


def test_deprecated_forms_still_work_and_warn():
    with pytest.warns(StreamvisorDeprecationWarning) as warned:
        with start_server(SCRIPTED + "\n[plugins.legacy]\n", plugins={"legacy": Legacy()}) as server:
            reply = server.openai().chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
    assert reply.choices[0].message.content == "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG."
    messages = [str(w.message) for w in warned]
    assert any("'legacy'" in m and "(request, call_next, session)" in m for m in messages)
    assert any("'legacy'" in m and "factory(session)" in m for m in messages)


@pytest.mark.parametrize("declared, ok", [("1.0", True), ("1", True), ("2.0", False), ("1.9", False), ("one", False), ("0.9", False)])
def test_the_contract_version_a_plugin_declares_is_checked(declared, ok):
    from streamvisor.config import ConfigError
    from streamvisor.hooks import PluginHost

    from .conftest import make_config

    class Versioned:
        streamvisor_contract = declared

        @hookimpl
        def startup(self):
            pass

    if ok:
        host = PluginHost.from_config(make_config("[plugins.v]\n"), {"v": Versioned})
        assert next(iter(host)).contract == declared
    else:
        with pytest.raises(ConfigError) as caught:
            PluginHost.from_config(make_config("[plugins.v]\n"), {"v": Versioned})
        assert "plugins.v" in str(caught.value) and declared in str(caught.value)


# -- terminal events: never dropped, bounded by sessions ------------------------------


class SlowLedger:
    """An async listener that takes `delay` seconds for each terminal event."""

    def __init__(self, delay):
        self.delay = delay
        self.recorded = []

    @hookimpl
    @listens_to("completed", "failed", "stopped", "disconnected")
    async def on_event(self, event):
        await trio.sleep(self.delay)
        self.recorded.append((event.session_id, event.usage.completion_tokens))


def test_a_slow_listener_records_every_terminal_event_and_streams_do_not_wait_for_it():
    # The fast subset of issue 8's figure (2,000 sessions at concurrency 64, in
    # bench/): 320 sessions, 64 at a time, a listener taking 20 ms per event.
    sessions, concurrency, delay = 320, 64, 0.02
    ledger = SlowLedger(delay)
    toml = SCRIPTED + "\n[plugins.ledger]\n"
    with start_server(toml, plugins={"ledger": ledger}, event_queue_size=8) as server:
        http = server.http(limits=__import__("httpx").Limits(max_connections=concurrency))
        body = {"model": "fox", "stream": True, "messages": [{"role": "user", "content": "go"}]}
        backlog = []
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            texts = list(pool.map(lambda _: http.post("/v1/chat/completions", json=body).text, range(sessions)))
            backlog.append(server.call(server.runtime.events.terminal_backlog))
        streamed = time.perf_counter() - t0
        assert all(text.endswith("data: [DONE]\n\n") for text in texts)
        server.wait_for(lambda: len(ledger.recorded) == sessions, timeout=60)
        drained = time.perf_counter() - t0
        stats = server.call(lambda: {s.plugin: s for s in server.runtime.events.stats})["ledger"]
    assert stats.dropped == 0 and stats.delivered == sessions
    assert sorted(set(s for s, _ in ledger.recorded)) == sorted(s for s, _ in ledger.recorded), "each session once"
    assert all(tokens == 9 for _, tokens in ledger.recorded)
    # The streams finished long before the listener did: they never waited for it.
    assert streamed < drained - 2
    assert max(backlog) <= sessions


def test_past_the_bound_a_lagging_listener_makes_new_sessions_wait_not_lose_records():
    ledger = SlowLedger(0.5)
    with start_server(SCRIPTED + "\n[plugins.ledger]\n", plugins={"ledger": ledger}, max_live_sessions=3) as server:
        client = server.openai()
        for _ in range(3):
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: len(ledger.recorded) == 3, timeout=10)
        after = client.chat.completions.create(model="fox", messages=[{"role": "user", "content": "go"}])
        server.wait_for(lambda: len(ledger.recorded) == 4, timeout=10)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "overloaded"
    assert refused.value.response.headers["Retry-After"] == "1"
    assert "recording finished sessions more slowly" in refused.value.body["message"]
    assert after.choices[0].message.content


# -- a third party's session directory (contract 1.3) ----------------------------------------


@attrs.define
class ElsewhereSession:
    """A session "on another server", as a directory plugin would hand it over."""

    id: str
    identity: str = "anonymous"
    team: str | None = None
    owner: str = "far-away:8000@0001"
    model: str = "fox"
    created_at: float = 1_700_000_000.0
    include_usage: bool = True
    stopped: bool = False

    def to_json(self):
        return {"id": self.id, "object": "session", "state": "stopped" if self.stopped else "running", "identity": self.identity}

    async def stop(self):
        self.stopped = True
        return True, {**self.to_json(), "stopped": True}

    async def delete(self):
        return True

    async def completion(self):
        return {"id": "chatcmpl-x", "object": "chat.completion", "choices": []}

    async def follow(self, offset, keepalive):
        from streamvisor.hooks import StoredSession, Usage

        words = ["The", " quick", " brown", " fox"]
        if offset < len(words):
            yield offset, [Delta(content=w) for w in words[offset:]]
        yield StoredSession(
            id=self.id, request_id="r", identity=self.identity, model="fox", provider="far", state="completed",
            created_at=self.created_at, finish_reason="stop", usage=Usage(3, 4), chunks=len(words), include_usage=True,
        )


class Directory:
    def __init__(self, sessions):
        self.sessions = {s.id: s for s in sessions}
        self.asked = []

    @hookimpl
    def register_session_directory(self, register):
        register(self)

    async def find(self, session_id):
        self.asked.append(session_id)
        return self.sessions.get(session_id)


def test_a_third_party_directory_serves_sessions_of_other_servers_under_core_s_rules():
    import httpx

    mine, theirs = ElsewhereSession("sess_" + "a" * 24), ElsewhereSession("sess_" + "b" * 24, identity="someone-else")
    directory = Directory([mine, theirs])
    with start_server(SCRIPTED + "\n[plugins.elsewhere]\n", plugins={"elsewhere": directory}) as server:
        base = server.url
        # Anonymous callers see anonymous sessions only: the other's is a 404 like an unknown id.
        assert httpx.get(f"{base}/v1/sessions/{mine.id}").json()["state"] == "running"
        assert httpx.get(f"{base}/v1/sessions/{theirs.id}").status_code == 404
        assert httpx.post(f"{base}/v1/sessions/{theirs.id}/stop").status_code == 404 and not theirs.stopped
        # Following: core's wire format, with the directory's offsets as ids, from Last-Event-ID.
        body = httpx.get(f"{base}/v1/sessions/{mine.id}/stream", headers={"Last-Event-ID": "1"}).text
        data = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
        assert ids[:2] == [2, 3] and data[-1] == "[DONE]"
        assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:2]) == " brown fox"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 4
        stopped = httpx.post(f"{base}/v1/sessions/{mine.id}/stop").json()
        assert stopped["stopped"] is True and stopped["delivered"] is True and mine.stopped
        assert httpx.get(f"{base}/v1/sessions/{mine.id}/completion").json()["object"] == "chat.completion"
        # A session this server runs never reaches the directory.
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "hi"}]})
        local = r.headers["X-Session-ID"]
        assert httpx.get(f"{base}/v1/sessions/{local}").status_code == 200 and local not in directory.asked


def test_two_session_directories_stop_start_up():
    from streamvisor.config import ConfigError

    with pytest.raises(RuntimeError) as caught:
        with start_server(SCRIPTED + "\n[plugins.one]\n[plugins.two]\n", plugins={"one": Directory([]), "two": Directory([])}):
            pass
    from streamvisor.hooks import unwrap

    cause = unwrap(caught.value.__cause__)
    assert isinstance(cause, ConfigError) and "plugins.two" in str(cause) and "session directory" in str(cause)


class SlowReader:
    """A route with its own body limit whose view reads the body as a stream,
    slower than the client sends it."""

    def __init__(self):
        self.pieces = []

    @hookimpl
    def register_routes(self, register):
        async def upload():
            total = 0
            async for piece in body_chunks():
                self.pieces.append(len(piece))
                total += len(piece)
                await trio.sleep(0.002)
            return {"bytes": total}

        async def echo():
            return {"bytes": len(await read_json())}

        register("/slow-reader", upload, methods=("POST",), max_body_bytes=64 << 20)
        register("/whole", echo, methods=("POST",))


def test_a_route_has_its_own_body_limit_and_a_body_read_as_a_stream_is_held_a_window_at_a_time():
    reader = SlowReader()
    with start_server(SCRIPTED + "\n[plugins.reader]\n", plugins={"reader": reader}, max_body_bytes=1 << 20) as server:
        http = server.http()
        sent = 16 << 20
        answer = http.post("/slow-reader", content=b"x" * sent)
        assert answer.status_code == 200 and answer.json() == {"bytes": sent}
        # However far behind the reader was, it never found more than the
        # window (and one network read) waiting: the rest waited in the client.
        assert sum(reader.pieces) == sent and max(reader.pieces) <= WINDOW + (256 << 10), max(reader.pieces)
        # Past the route's limit: 413, streamed or whole; other routes keep [server] max_body_bytes.
        assert http.post("/slow-reader", content=b"x" * ((64 << 20) + 1)).status_code == 413
        chunked = http.post("/slow-reader", content=iter([b"x" * (1 << 20)] * 65))
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert http.post("/whole", content=b'"' + b"y" * (2 << 20) + b'"').status_code == 413
        assert http.post("/whole", content=b'"' + b"y" * 1000 + b'"').json() == {"bytes": 1000}


def test_a_route_body_limit_that_is_not_a_size_stops_start_up():
    class Bad:
        @hookimpl
        def register_routes(self, register):
            async def view():
                return {}

            register("/bad", view, methods=("POST",), max_body_bytes=0)

    with pytest.raises(RuntimeError) as caught:
        with start_server(SCRIPTED + "\n[plugins.bad]\n", plugins={"bad": Bad()}):
            pass
    assert "max_body_bytes" in repr(caught.value.__cause__)
