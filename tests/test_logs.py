"""Log lines: what a plugin adds to them with `add_log_fields` (contract 1.6),
as `streamvisor serve` writes them (console and JSON lines), and the session
id on the lines of a session's own task."""

from __future__ import annotations

import json
import logging
from typing import Any

from streamvisor.core.logs import CONSOLE_FORMAT, JSONLinesFormatter
from streamvisor.hooks import add_log_fields, hookimpl, log_context

from .conftest import SCRIPTED, start_server

log = logging.getLogger("streamvisor.test.tenant")


class TenantLogs:
    """A third party's plugin: each session's tenant (from the request's
    `user`) on its log lines, and a line of its own from the middleware."""

    def __init__(self) -> None:
        self.tenants: dict[str, str] = {}
        self.remove: Any = None

    def fields(self, record: logging.LogRecord) -> dict[str, str] | None:
        tenant = self.tenants.get(record.session_id)
        return None if tenant is None else {"tenant": tenant, "message": "not the message"}

    @hookimpl
    def startup(self) -> None:
        self.remove = add_log_fields(self.fields)

    @hookimpl
    def shutdown(self) -> None:
        self.remove()

    @hookimpl
    def register_middleware(self, register: Any) -> None:
        def middleware(request: Any, call_next: Any, session: Any) -> Any:
            self.tenants[session.id] = request.user or "none"
            log.info("calling the provider")
            return call_next(request)

        register(middleware)


def test_a_plugins_fields_are_on_its_sessions_lines_and_gone_after_its_shutdown(caplog):
    plugin = TenantLogs()
    console, jsonl = logging.Formatter(CONSOLE_FORMAT), JSONLinesFormatter()
    with caplog.at_level(logging.INFO), start_server("[plugins.tenant]\n" + SCRIPTED, plugins={"tenant": plugin}) as server:
        response = server.http().post("/v1/chat/completions", json={"model": "fox", "messages": [{"role": "user", "content": "x"}], "user": "acme"})
        session_id = response.headers["x-session-id"]
    (record,) = [r for r in caplog.records if r.name == "streamvisor.test.tenant"]
    # The middleware runs in the session's task: its line has the session's id, so the plugin's field.
    assert record.session_id == session_id and record.log_fields == {"tenant": "acme", "message": "not the message"}
    assert f"session_id={session_id} tenant=acme message=not the message calling the provider" in console.format(record)
    line = json.loads(jsonl.format(record))
    assert line["tenant"] == "acme" and line["message"] == "calling the provider"  # a core key is never replaced
    # After the plugin's shutdown its source is gone: a line of the same session is the default line.
    with log_context("req", session_id):
        later = log.makeRecord(log.name, logging.INFO, __file__, 1, "later", (), None)
    assert plugin.fields(later) is not None  # the plugin still knows the session...
    assert later.log_fields == {} and console.format(later).endswith(f"session_id={session_id} later")  # ...but is not asked


def test_a_failing_source_adds_nothing_and_breaks_no_line():
    def broken(record: logging.LogRecord) -> dict[str, str]:
        raise RuntimeError("no")

    remove = add_log_fields(broken)
    try:
        record = logging.getLogger("streamvisor.test").makeRecord("x", logging.WARNING, __file__, 1, "still %s", ("written",), None)
    finally:
        remove()
    assert record.log_fields == {} and logging.Formatter(CONSOLE_FORMAT).format(record).endswith("session_id=- still written")
