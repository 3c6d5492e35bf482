"""The plugin author's test kit: real servers, a scripted provider, an `openai`
client, captured events and a fake upstream that fails on demand.

Installed with streamvisor and loaded by pytest on its own (the `pytest11` entry
point), it gives these fixtures to any test suite:

- `streamvisor_server`: a running server on a loopback port with the plugins of
  `streamvisor_toml`, the scripted provider's models (`SCRIPTED_MODELS`) and an
  `EventLog` (as `streamvisor_server.events`);
- `openai_client`: an `openai.OpenAI` client of that server;
- `streamvisor_events`: the `EventLog` of that server;
- `fake_upstream`: a `FakeUpstream` on a loopback port.

A suite configures them by overriding three fixtures: `streamvisor_toml` (the
plugins.toml text for the plugins under test), `streamvisor_plugins` (plugin
objects to use instead of looking names up) and `streamvisor_server_settings`
(`[server]` settings). Outside pytest, `start_server()` is the same server as a
context manager, and `postgres_database(admin_url)` gives a test (of a store,
say) a fresh PostgreSQL database that is dropped after it.
"""

from __future__ import annotations

from .events import EventLog
from .postgres import postgres_database
from .server import ServerThread, make_config, start_server
from .upstream import ConnectionRecord, FakeUpstream, Reply, closed_port, completion_events, sse

#: The scripted provider's models every `streamvisor_server` serves:
#: `scripted` (a fixed sentence), `echo` (the last user message, word by word),
#: `slow` (a word every 20 ms for minutes) and `broken` (fails before its first chunk).
SCRIPTED_MODELS = """
[[plugins.scripted.models]]
name = "scripted"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "slow"
text = "tick"
repeat = 10000
delay = 0.02

[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000
error_status = 502
"""

__all__ = [
    "ConnectionRecord",
    "EventLog",
    "FakeUpstream",
    "Reply",
    "SCRIPTED_MODELS",
    "ServerThread",
    "closed_port",
    "completion_events",
    "make_config",
    "postgres_database",
    "sse",
    "start_server",
]
