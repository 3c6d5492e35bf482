"""The public plugin contract: everything a plugin may import, in one place.

A plugin imports from here and nowhere else in streamvisor::

    from streamvisor.hooks import Delta, hookimpl, listens_to

Every name in `__all__` is documented in docs/hooks.md ("The public API") and
follows the stability policy of `CONTRACT_VERSION`. The modules these names come
from (`streamvisor.core.*`) are the runtime's own: their other names may change
in any release, and a test keeps the built-in plugins off them.
"""

from __future__ import annotations

from typing import Any

from streamvisor.config.errors import ConfigError
from streamvisor.config.validators import at_least_one, not_negative, positive
from streamvisor.core import httpclient
from streamvisor.core.auth import ADMIN, ANONYMOUS, Admission, Principal, current_principal
from streamvisor.core.chat import ChatRequest, Delta, Usage, delta_from_json, deltas_to_json, message_text
from streamvisor.core.directory import RemoteSession, SessionDirectory
from streamvisor.core.errors import (
    APIError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from streamvisor.core.events import TERMINAL_TYPES, Event, EventType, ListenerStats, Outcome
from streamvisor.core.health import Health
from streamvisor.core.logs import add_log_fields, log_context
from streamvisor.core.redis import Connection as RedisConnection
from streamvisor.core.redis import RedisError, RespClient
from streamvisor.core.redis import Script as RedisScript
from streamvisor.core.metrics import Labelled
from streamvisor.core.providers import ModelInfo, Provider, ProviderRegistry, Route
from streamvisor.core.sessions import LIVE_STATES, Session, SessionRegistry, unwrap
from streamvisor.core.sse import SSEBoundError, SSEDecoder
from streamvisor.core.store import INTERRUPTED, OutboxItem, QueuedItem, QueueStore, RecordStore, completion_object, stored_of, SessionQuery, SessionStore, StoredSession, UsageRow
from streamvisor.core.web import ADMIN_KEY_ENV, admin_key, bearer_token, body_chunks, check_admin, json_response, read_json, require_admin

from .manager import BUILTIN_PLUGINS, DEFAULT_STACK, ENTRY_POINT_GROUP, LoadedPlugin, PluginHost  # noqa: F401 (the host's, for the CLI and tests)
from .markers import CONTRACT_VERSION, StreamvisorDeprecationWarning, hookimpl, hookspec, listens_to

__all__ = [
    # the contract
    "CONTRACT_VERSION",
    "StreamvisorDeprecationWarning",
    "hookimpl",
    "hookspec",
    "listens_to",
    "Runtime",
    # chat data
    "ChatRequest",
    "Delta",
    "Usage",
    "message_text",
    "deltas_to_json",
    "delta_from_json",
    # providers
    "ModelInfo",
    "Provider",
    "ProviderRegistry",
    "Route",
    "httpclient",
    "SSEDecoder",
    "SSEBoundError",
    # sessions and events
    "Session",
    "SessionRegistry",
    "Event",
    "EventType",
    "Outcome",
    "ListenerStats",
    "TERMINAL_TYPES",
    # the session store (contract 1.1)
    "SessionStore",
    "StoredSession",
    "SessionQuery",
    "UsageRow",
    "INTERRUPTED",
    "LIVE_STATES",
    # who asks, and what it costs (contract 1.2)
    "RecordStore",
    "Principal",
    "Admission",
    "ANONYMOUS",
    "ADMIN",
    "current_principal",
    "bearer_token",
    "check_admin",
    # many instances (contract 1.3)
    "SessionDirectory",
    "RemoteSession",
    "completion_object",
    "RespClient",
    "RedisConnection",
    "RedisError",
    "RedisScript",
    # the outbox, events outside sessions (contract 1.5)
    "QueueStore",
    "OutboxItem",
    "QueuedItem",
    "stored_of",
    # errors
    "APIError",
    "InvalidRequest",
    "NotFound",
    "ModelNotFound",
    "UpstreamError",
    "UpstreamTimeout",
    "RateLimited",
    "Overloaded",
    "InternalError",
    "unwrap",
    # routes, health, metrics, logs
    "json_response",
    "read_json",
    "body_chunks",
    "require_admin",
    "admin_key",
    "ADMIN_KEY_ENV",
    "Health",
    "Labelled",
    "log_context",
    "add_log_fields",
    # settings
    "ConfigError",
    "positive",
    "not_negative",
    "at_least_one",
]


def __getattr__(name: str) -> Any:
    # The runtime imports this package's manager: importing the runtime here,
    # eagerly, would be circular.
    if name == "Runtime":
        from streamvisor.core.runtime import Runtime

        return Runtime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
