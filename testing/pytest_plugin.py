"""The pytest fixtures of `streamvisor.testing` (see its docstring)."""

from __future__ import annotations

import tomllib
from typing import Any, Iterator

import pytest

from . import SCRIPTED_MODELS
from .events import EventLog
from .server import ServerThread, start_server
from .upstream import FakeUpstream

#: The table name the captured-events listener runs under.
EVENTS_PLUGIN = "captured-events"


@pytest.fixture
def streamvisor_toml() -> str:
    """plugins.toml text for the plugins under test; override it in your conftest.py."""
    return ""


@pytest.fixture
def streamvisor_plugins() -> dict[str, Any]:
    """Plugin objects or classes by table name, used instead of entry points."""
    return {}


@pytest.fixture
def streamvisor_server_settings() -> dict[str, Any]:
    """`[server]` settings of the test server (port 0 and debug logs are set already)."""
    return {}


@pytest.fixture
def streamvisor_events() -> EventLog:
    """The events the test server dispatched."""
    return EventLog()


@pytest.fixture
def streamvisor_server(
    streamvisor_toml: str, streamvisor_plugins: dict[str, Any], streamvisor_server_settings: dict[str, Any], streamvisor_events: EventLog
) -> Iterator[ServerThread]:
    """A running server: the scripted provider (unless your toml configures it),
    your plugins, and the event log last."""
    data = tomllib.loads(streamvisor_toml)
    plugins = data.get("plugins", {})
    ordered: dict[str, Any] = {}
    if "scripted" not in plugins:
        ordered["scripted"] = tomllib.loads(SCRIPTED_MODELS)["plugins"]["scripted"]
    ordered.update(plugins)
    ordered[EVENTS_PLUGIN] = {}
    data["plugins"] = ordered
    with start_server(data, plugins={**streamvisor_plugins, EVENTS_PLUGIN: streamvisor_events}, **streamvisor_server_settings) as server:
        server.events = streamvisor_events  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def openai_client(streamvisor_server: ServerThread) -> Any:
    """An `openai.OpenAI` client of the test server."""
    return streamvisor_server.openai()


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A scripted OpenAI-compatible upstream on a loopback port (`.url` is its /v1)."""
    upstream = FakeUpstream()
    try:
        yield upstream
    finally:
        upstream.close()
