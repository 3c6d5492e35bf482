"""The hook contract from a plugin's side: observation, middleware, transformers,
sync and async hooks, and plugins.toml order."""

from __future__ import annotations

import json

import attrs
import trio

from streamvisor.core.chat import Delta
from streamvisor.hooks import hookimpl, listens_to

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
