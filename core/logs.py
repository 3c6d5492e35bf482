"""Logging with the request id and session id on every line.

The ids live in context variables: trio copies the context into tasks it spawns,
so a session actor started from a request handler logs with that request's id.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")


_base_factory = logging.getLogRecordFactory()


def _record_with_ids(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.request_id = request_id_var.get()
    record.session_id = session_id_var.get()
    return record


# Every record, from any logger and any handler, carries the ids.
logging.setLogRecordFactory(_record_with_ids)


@contextlib.contextmanager
def log_context(request_id: str | None, session_id: str | None) -> Iterator[None]:
    """Log with these ids inside the block, from code that runs outside the
    request (an event listener, a service): the ids cannot be passed as
    `extra=`, because every record already carries them."""
    request_token = request_id_var.set(request_id or "-")
    session_token = session_id_var.set(session_id or "-")
    try:
        yield
    finally:
        session_id_var.reset(session_token)
        request_id_var.reset(request_token)


class JSONLinesFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "session_id": getattr(record, "session_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s request_id=%(request_id)s session_id=%(session_id)s %(message)s"


def configure(level: str = "info", format: str = "console") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLinesFormatter() if format == "json" else logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("streamvisor.ready").setLevel(logging.INFO)
    # hypercorn's own access log would repeat ours without the ids.
    logging.getLogger("hypercorn.access").disabled = True
