"""Logging with the request id and session id on every line, and the fields
plugins add (`add_log_fields`: the otel plugin's trace and span ids).

The ids live in context variables: trio copies the context into tasks it spawns,
so a session actor started from a request handler logs with that request's id
(and sets its own session's id).

A log message is one line whatever it quotes: control characters in the message
and in the ids (a client's percent-encoded CR/LF in a path, an upstream's error
text) are written escaped (`\\r`, `\\n`, `\\x1b`), so nobody who can send a
request can forge a log line or a terminal escape. Tracebacks (`exc_info`) still
span several lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
session_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")


#: What could end a line or drive a terminal: C0 and C1 control characters
#: (tab included), DEL, and Unicode's line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def one_line(text: str) -> str:
    """`text` with its control characters escaped (CR/LF as `\\r\\n`)."""
    # isprintable() is a fast scan in C and true for almost every message.
    return text if text.isprintable() else _UNSAFE.sub(_escaped, text)


class _OneLineRecord(logging.LogRecord):
    def getMessage(self) -> str:
        # Escaped when formatted, not when logged: a record no handler writes
        # costs nothing more, and `msg` and `args` stay as the caller gave them.
        return one_line(super().getMessage())


def _one_line_class(cls: type[logging.LogRecord]) -> type[logging.LogRecord]:
    """A subclass of `cls` whose messages are escaped, for records made by a
    factory installed before this module's."""
    get_message = cls.getMessage

    def getMessage(self: logging.LogRecord) -> str:
        return one_line(get_message(self))

    return type(cls.__name__, (cls,), {"getMessage": getMessage})


_base_factory = logging.getLogRecordFactory()
_one_line_classes: dict[type, type] = {_OneLineRecord: _OneLineRecord}


def _record_with_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
    if _base_factory is logging.LogRecord:
        record: logging.LogRecord = _OneLineRecord(*args, **kwargs)
    else:
        record = _base_factory(*args, **kwargs)
        cls = type(record)
        if cls not in _one_line_classes:
            _one_line_classes[cls] = _one_line_class(cls)
        record.__class__ = _one_line_classes[cls]
    record.request_id = one_line(request_id_var.get())
    record.session_id = one_line(session_id_var.get())
    if _field_sources:
        _add_fields(record)
    else:
        record.log_fields = _NO_FIELDS
        record.log_fields_text = ""
    return record


#: What `add_log_fields` registered, called for every record. A tuple, swapped
#: whole: the factory reads it without a lock, from any thread.
_field_sources: tuple[Callable[[logging.LogRecord], Mapping[str, Any] | None], ...] = ()
_field_sources_lock = threading.Lock()
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})


def _add_fields(record: logging.LogRecord) -> None:
    fields: dict[str, str] = {}
    for source in _field_sources:
        try:
            more = source(record)
        except Exception:
            # Logging from here would come back here: a failing source adds nothing.
            continue
        if more:
            for name, value in more.items():
                key = one_line(str(name))
                if value is not None and key not in fields:
                    fields[key] = one_line(str(value))
    record.log_fields = fields or _NO_FIELDS
    record.log_fields_text = "".join(f" {name}={value}" for name, value in fields.items())


def add_log_fields(source: Callable[[logging.LogRecord], Mapping[str, Any] | None]) -> Callable[[], None]:
    """Add fields to every log line, such as a trace id: `source(record)` is
    called as each record is made, in the thread that logs (the record has its
    `request_id` and `session_id` already), and returns a mapping of field
    names to values, or None for a line it has nothing to add to. The console
    format writes them as `name=value` after the session id, the JSON lines as
    keys; a record keeps them in `record.log_fields`. Of two sources giving a
    field, the first registered wins; one that raises adds nothing. The source
    runs for every line of the process, so it must be quick and must not log.

    Returns the function that removes the source again (call it at shutdown).
    With no source registered a line costs nothing more."""
    global _field_sources
    with _field_sources_lock:
        _field_sources = (*_field_sources, source)

    def remove() -> None:
        global _field_sources
        with _field_sources_lock:
            _field_sources = tuple(s for s in _field_sources if s is not source)

    return remove


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
        for name, value in getattr(record, "log_fields", _NO_FIELDS).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


#: The console line; `log_fields_text` is empty unless a plugin adds fields
#: (" trace_id=... span_id=...").
CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s request_id=%(request_id)s session_id=%(session_id)s%(log_fields_text)s %(message)s"


def configure(level: str = "info", format: str = "console") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLinesFormatter() if format == "json" else logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("streamvisor.ready").setLevel(logging.INFO)
    # hypercorn's own access log would repeat ours without the ids.
    logging.getLogger("hypercorn.access").disabled = True
