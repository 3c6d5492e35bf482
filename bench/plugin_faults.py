"""Plugin faults: a test plugin raises, hangs, then returns garbage, in every
hook in turn, and the rest of the server must not notice.

Owns: the fault plugin (`make_faulty`), the matrix of (hook, mode) cases, and
running one case against a real server (`run_case`), which reports what a user
would see: whether the server started (or refused to, saying why), whether
streams of another model were byte-identical to a server without the plugin,
whether the fault was counted against the plugin and shown by admin, whether
the server stayed ready, and how long shutdown took. `tests/test_plugin_faults.py`
runs every case; `python -m bench.reliability` reports them in its table.

The faulty plugin misbehaves only for the model `victim`, where a hook sees a
model at all; streams of `fox` go through it too and must come out unchanged.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import attrs
import httpx
import trio

from streamvisor.hooks import hookimpl, listens_to

HOOKS = (
    "startup",
    "register_event_types",
    "register_providers",
    "register_middleware",
    "register_chunk_transformers",
    "register_routes",
    "register_services",
    "register_health_checks",
    "register_status_panels",
    "middleware",
    "transformer",
    "listener",
    "route",
    "service",
    "health_check",
    "status_panel",
    "shutdown",
)
MODES = ("raise", "hang", "garbage")
#: Start-up hooks: a fault there must stop start-up with a clear message (a
#: garbage return of `startup` is ignored: it returns nothing).
STARTUP_HOOKS = HOOKS[:9]

SCRIPTED = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "victim"
text = "one two three four"
"""
# The checks and panels answer within the routes' own timeout (0.3 s).
_STACK = "\n[plugins.health]\ncheck_timeout_seconds = 0.2\n[plugins.admin]\npanel_timeout_seconds = 0.2\n"
PLAIN = SCRIPTED + _STACK
FAULTY = SCRIPTED + "\n[plugins.faulty]\n" + _STACK
SERVER = {
    "startup_timeout_seconds": 0.5,
    "listener_timeout_seconds": 0.2,
    "route_timeout_seconds": 0.3,
    "shutdown_grace_seconds": 1.0,
    "restart_intensity": 3,
    "restart_period_seconds": 10,
    "log_level": "warning",
}
KEY = "reliability-admin-key"


class Boom(RuntimeError):
    pass


def make_faulty(hook: str, mode: str) -> Any:
    """A plugin whose `hook` raises, hangs or returns garbage; every other hook
    it implements works."""

    async def misbehave(value: Any = None) -> Any:
        if mode == "raise":
            raise Boom(f"injected fault in {hook}")
        if mode == "hang":
            await trio.sleep_forever()
        return value

    def misbehave_sync(value: Any = None) -> Any:
        if mode == "raise":
            raise Boom(f"injected fault in {hook}")
        return value

    garbage = object()

    class Faulty:
        streamvisor_contract = "1.0"

        # -- start-up hooks: only the one under test is defined ---------------
        if hook == "startup":

            @hookimpl
            async def startup(self, runtime):
                return await misbehave(42)

        if hook == "register_middleware":

            @hookimpl
            async def register_middleware(self, register):
                if mode == "garbage":
                    register(garbage)
                else:
                    await misbehave()

        elif hook == "middleware":

            @hookimpl
            def register_middleware(self, register):
                async def faulty(request, call_next, session):
                    if request.model == "victim":
                        await misbehave()
                    async for delta in call_next(request):
                        yield delta

                def garbage_maker(request, call_next, session):
                    return 42 if request.model == "victim" else call_next(request)

                register(garbage_maker if mode == "garbage" else faulty)

        if hook == "register_chunk_transformers":

            @hookimpl
            async def register_chunk_transformers(self, register):
                if mode == "garbage":
                    register(garbage)
                else:
                    await misbehave()

        elif hook == "transformer":

            @hookimpl
            def register_chunk_transformers(self, register):
                def factory(session):
                    if session.model != "victim":
                        return lambda delta: delta

                    def transform(delta):
                        if mode == "raise":
                            raise Boom("injected fault in a transformer")
                        if mode == "hang":
                            return trio.sleep_forever()  # a coroutine: what an async transform gives
                        return "garbage"

                    return transform

                register(factory)

        if hook == "register_services":

            @hookimpl
            async def register_services(self, register):
                if mode == "garbage":
                    register("svc", garbage)
                else:
                    await misbehave()

        elif hook == "service":

            @hookimpl
            def register_services(self, register):
                async def crashing():
                    await trio.sleep(0.01)
                    raise Boom("injected fault in a service")

                async def hanging():
                    await trio.sleep_forever()

                def garbage_service():
                    return 42  # not awaitable

                register("svc", {"raise": crashing, "hang": hanging, "garbage": garbage_service}[mode])

        if hook == "register_health_checks":

            @hookimpl
            async def register_health_checks(self, register):
                if mode == "garbage":
                    register("check", garbage)
                else:
                    await misbehave()

        elif hook == "health_check":

            @hookimpl
            def register_health_checks(self, register):
                async def check():
                    return await misbehave("not a Health")

                register("check", check)

        if hook == "status_panel":

            @hookimpl
            def register_status_panels(self, register):
                async def panel():
                    return await misbehave({1, 2})  # a set: not JSON

                register("panel", panel)

        if hook == "listener":

            @hookimpl
            @listens_to("completed", "failed", "stopped", "disconnected")
            async def on_event(self, event):
                return await misbehave(42)

        if hook == "route":

            @hookimpl
            def register_routes(self, register):
                async def view():
                    return await misbehave(42)

                register("/faulty/route", view)

        if hook == "shutdown":

            @hookimpl
            async def shutdown(self):
                return await misbehave(42)

    if hook in ("register_event_types", "register_providers", "register_routes", "register_status_panels"):

        async def register_garbage(self: Any, register: Any) -> None:
            if mode == "garbage":
                register(garbage, garbage)
            else:
                await misbehave()

        setattr(Faulty, hook, hookimpl(specname=hook)(register_garbage))
    return Faulty()


@attrs.define
class CaseResult:
    hook: str
    mode: str
    #: "started", or why the server refused to start.
    start: str
    #: The expected behaviour held (see `run_case`).
    held: bool = True
    notes: list[str] = attrs.field(factory=list)
    identical: bool | None = None
    fault_counted: bool | None = None
    ready: bool | None = None
    shutdown_seconds: float | None = None

    def fail(self, note: str) -> None:
        self.held = False
        self.notes.append(note)


def _stream(server: Any, model: str) -> list[Any]:
    """A streamed completion's events, without the per-request ids."""
    with server.http(timeout=10) as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": model, "stream": True, "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "go"}]},
        )
    out: list[Any] = [response.status_code]
    for event in response.text.split("\n\n"):
        if not event:
            continue
        data = event.splitlines()[-1].removeprefix("data: ")
        if data == "[DONE]":
            out.append(data)
            continue
        chunk = json.loads(data)
        chunk.pop("id", None), chunk.pop("created", None)
        out.append(chunk)
    return out


def baseline(start_server: Any) -> list[Any]:
    with start_server(PLAIN, **SERVER) as server:
        return _stream(server, "fox")


def run_case(hook: str, mode: str, expected: list[Any], start_server: Any) -> CaseResult:
    """Run one case; `expected` is `baseline()`'s fox stream."""
    from streamvisor.core.faults import PluginError
    from streamvisor.config import ConfigError
    from streamvisor.hooks import unwrap

    result = CaseResult(hook, mode, "started")
    os.environ["STREAMVISOR_ADMIN_KEY"] = KEY
    plugin = make_faulty(hook, mode)
    try:
        context = start_server(FAULTY, plugins={"faulty": plugin}, **SERVER)
        server = context.__enter__()
    except RuntimeError as exc:
        inner = unwrap(exc.__cause__) if exc.__cause__ is not None else exc
        result.start = f"refused: {inner}"
        clear = isinstance(inner, (PluginError, ConfigError)) and "faulty" in str(inner)
        if hook not in STARTUP_HOOKS or (hook == "startup" and mode == "garbage"):
            result.fail(f"the server did not start: {inner}")
        elif not clear:
            result.fail(f"start-up failed without naming the plugin: {inner!r}")
        return result
    stopped_at = None
    try:
        if hook in STARTUP_HOOKS and not (hook == "startup" and mode == "garbage"):
            result.fail("the server started although a start-up hook failed")
        got = _stream(server, "fox")
        result.identical = got == expected
        if not result.identical:
            result.fail("a fox stream differed from the plain server's")
        victim = _victim(server, hook, mode)
        if victim:
            result.notes.append(victim)
        ready = server.http(timeout=10).get("/health/ready")
        result.ready = ready.status_code == 200
        if not result.ready and hook != "health_check":
            result.fail(f"not ready: {ready.json().get('reasons')}")
        if hook == "health_check" and result.ready:
            result.fail("a broken check left the server ready")
        admin = server.http(timeout=10, headers={"Authorization": f"Bearer {KEY}"})
        if hook == "status_panel":
            status = admin.get("/admin/status")
            if status.status_code != 200:
                result.fail(f"/admin/status answered {status.status_code}")
        if hook == "service" and mode != "hang":
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _faulty(admin)["errors"]["faults"]:
                time.sleep(0.05)
        if hook == "listener":
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (_faulty(admin)["listener"] or {}).get("errors") and mode != "garbage":
                time.sleep(0.02)
        status = _faulty(admin)
        result.fault_counted = status["errors"]["total"] > 0
        if _expects_fault(hook, mode) and not result.fault_counted:
            result.fail(f"the fault was not counted: {status['errors']}")
        stopped_at = time.monotonic()
    finally:
        t0 = time.monotonic()
        context.__exit__(None, None, None)
        if stopped_at is not None:
            result.shutdown_seconds = round(time.monotonic() - t0, 3)
            if result.shutdown_seconds > SERVER["shutdown_grace_seconds"] + 2.0:
                result.fail(f"shutdown took {result.shutdown_seconds} s, grace is {SERVER['shutdown_grace_seconds']} s")
    return result


def _faulty(admin: httpx.Client) -> dict[str, Any]:
    plugins = admin.get("/admin/plugins").json()["plugins"]
    return next(p for p in plugins if p["name"] == "faulty")


def _expects_fault(hook: str, mode: str) -> bool:
    """Whether admin must show a count against the plugin."""
    if hook in ("middleware",):
        return mode != "hang"  # a hung middleware is a slow stream, not a fault
    if hook == "transformer":
        return True
    if hook == "listener":
        return mode != "garbage"  # a listener's return value is ignored
    if hook in ("route", "health_check", "service"):
        return mode != "hang" or hook != "service"
    if hook == "status_panel":
        return mode != "garbage"  # a set is shown as text
    return False


def _victim(server: Any, hook: str, mode: str) -> str | None:
    """Exercise the hook under test; a note on what the victim saw."""
    if hook in ("middleware", "transformer"):
        timeout = 1.0 if (hook, mode) == ("middleware", "hang") else 10
        try:
            with server.http(timeout=timeout) as http:
                response = http.post("/v1/chat/completions", json={"model": "victim", "messages": [{"role": "user", "content": "go"}]})
            return f"victim: {response.status_code}"
        except httpx.TimeoutException:
            return "victim: no answer (the client left)"
    if hook == "route":
        response = server.http(timeout=10).get("/faulty/route")
        return f"route: {response.status_code}"
    if hook == "listener":
        server.openai().chat.completions.create(model="victim", messages=[{"role": "user", "content": "go"}])
    return None


def run_matrix(start_server: Any) -> list[CaseResult]:
    expected = baseline(start_server)
    return [run_case(hook, mode, expected, start_server) for hook in HOOKS for mode in MODES]
