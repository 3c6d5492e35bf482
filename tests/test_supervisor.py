"""The one_for_one supervisor, directly and inside a running server."""

from __future__ import annotations

import pytest
import trio

from streamvisor.core.supervisor import ChildSpec, Restart, Supervisor, SupervisorEscalation
from streamvisor.hooks import hookimpl

from .conftest import start_server


async def test_a_crashing_permanent_child_is_restarted_and_its_siblings_keep_running():
    runs = {"flaky": 0, "steady": 0}

    async def flaky():
        runs["flaky"] += 1
        if runs["flaky"] <= 2:
            raise ValueError("crash")
        await trio.sleep_forever()

    async def steady():
        runs["steady"] += 1
        await trio.sleep_forever()

    supervisor = Supervisor("test", intensity=3, period=10)
    supervisor.start_child(ChildSpec("flaky", flaky))
    supervisor.start_child(ChildSpec("steady", steady))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        with trio.fail_after(5):
            while runs["flaky"] < 3:
                await trio.sleep(0.01)
        assert runs["steady"] == 1  # one_for_one: the sibling was not restarted
        assert supervisor.children["flaky"].crashes == 2
        assert supervisor.children["flaky"].running
        assert "ValueError: crash" in supervisor.children["flaky"].last_error
        nursery.cancel_scope.cancel()


async def test_too_many_crashes_in_the_period_escalate():
    async def always_crashes():
        raise RuntimeError("broken for good")

    supervisor = Supervisor("test", intensity=3, period=10)
    supervisor.start_child(ChildSpec("doomed", always_crashes))
    with pytest.raises(BaseExceptionGroup) as caught:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
    assert caught.group_contains(SupervisorEscalation, depth=None)
    assert supervisor.children["doomed"].crashes == 4  # intensity + 1


async def test_restart_types():
    ends = {"temporary": 0, "transient-ok": 0, "transient-crash": 0}

    async def temporary():
        ends["temporary"] += 1
        raise ValueError("not restarted")

    async def transient_ok():
        ends["transient-ok"] += 1

    async def transient_crash():
        ends["transient-crash"] += 1
        if ends["transient-crash"] == 1:
            raise ValueError("restarted once")

    supervisor = Supervisor("test", intensity=5, period=10)
    supervisor.start_child(ChildSpec("temporary", temporary, Restart.TEMPORARY))
    supervisor.start_child(ChildSpec("transient-ok", transient_ok, Restart.TRANSIENT))
    supervisor.start_child(ChildSpec("transient-crash", transient_crash, Restart.TRANSIENT))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert ends == {"temporary": 1, "transient-ok": 1, "transient-crash": 2}
    assert supervisor.children == {}  # finished children leave no record


async def test_crashes_outside_the_period_do_not_add_up(autojump_clock):
    crashes = 0

    async def crashes_every_minute():
        nonlocal crashes
        await trio.sleep(60)
        crashes += 1
        raise ValueError("rare crash")

    supervisor = Supervisor("test", intensity=1, period=10)
    supervisor.start_child(ChildSpec("rare", crashes_every_minute))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(60 * 10 + 1)
        nursery.cancel_scope.cancel()
    assert crashes == 10


class CrashingService:
    """A plugin whose service actor crashes on its first two runs."""

    def __init__(self):
        self.runs = 0

    @hookimpl
    def register_services(self, register):
        async def heartbeat():
            self.runs += 1
            if self.runs <= 2:
                raise ConnectionError("lost the heartbeat")
            await trio.sleep_forever()

        register("heartbeat", heartbeat)


def test_a_crashing_service_is_restarted_and_the_server_keeps_serving():
    plugin = CrashingService()
    toml = """
[plugins.crashy]
[plugins.scripted]
"""
    with start_server(toml, plugins={"crashy": plugin}) as server:
        server.wait_for(lambda: plugin.runs >= 3)
        stats = server.call(lambda: next(p for p in server.runtime.plugin_status() if p["name"] == "crashy")["services"]["heartbeat"])
        assert stats["crashes"] == 2 and stats["running"]
        reply = server.openai().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
        assert reply.choices[0].message.content


class HopelessService:
    @hookimpl
    def register_services(self, register):
        async def hopeless():
            raise RuntimeError("cannot start")

        register("hopeless", hopeless)


def test_a_plugin_whose_service_keeps_crashing_loses_it_and_the_server_goes_on():
    toml = "[plugins.hopeless]\n[plugins.scripted]"
    with start_server(toml, plugins={"hopeless": HopelessService()}, restart_intensity=2, restart_period_seconds=30) as server:
        def status():
            return next(p for p in server.runtime.plugin_status() if p["name"] == "hopeless")

        server.wait_for(lambda: status()["faults"].get("services"), timeout=15)
        hopeless = server.call(status)
        reply = server.openai().chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}])
    assert hopeless["services"]["hopeless"]["starts"] == 3 and not hopeless["services"]["hopeless"]["running"]
    assert "gave up" in hopeless["faults"]["services"]["last_error"]
    assert reply.choices[0].message.content
