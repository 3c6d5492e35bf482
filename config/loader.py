"""Reading plugins.toml.

The file has one `[server]` table for the core and one `[plugins.NAME]` table per
plugin. A plugin runs only when its table is present (and `enabled` is not false):
installed code never runs on a server unless configured. String values may use
`${NAME}` or `${NAME:-default}` to read the environment, so secrets stay out of
the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError
from .schema import build_settings, describe
from .validators import positive

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _check_redis_url(value: str) -> None:
    if value and not value.startswith(("redis://", "rediss://")):
        raise ValueError(f"expected a redis:// or rediss:// URL, got {value.split('@')[-1]!r}")


@attrs.frozen
class ServerSettings:
    """The `[server]` table: settings of the core itself."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=8000, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    #: Largest request body accepted, in bytes; larger ones get 413.
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=positive)
    #: How long a finished session stays inspectable (GET /v1/sessions/{id}).
    session_retention_seconds: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
    #: Finished sessions kept for inspection at most (the oldest go first).
    max_retained_sessions: int = attrs.field(default=10_000, validator=positive)
    #: The bound of one session's chunk buffer; a stream that exceeds it fails.
    max_session_chunks: int = attrs.field(default=100_000, validator=positive)
    #: The bound on sessions running at once (plus the terminal events a
    #: listener has yet to handle); past it requests get 503.
    max_live_sessions: int = attrs.field(default=20_000, validator=positive)
    #: The bound on the bytes all session buffers hold together (an estimate:
    #: text plus ~200 bytes a chunk); past it new sessions get 503.
    max_buffered_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=positive)
    #: Live background sessions (`"background": true`) one identity may have;
    #: past it requests get 429.
    max_background_sessions: int = attrs.field(default=100, validator=positive)
    #: How often a follower of a session (GET /v1/sessions/{id}/stream) gets a
    #: keep-alive comment while no chunk arrives.
    keepalive_seconds: float = attrs.field(default=15.0, validator=positive)
    #: The bound of each event listener's queue of non-terminal events; events
    #: past it are dropped and counted (terminal events are never dropped).
    event_queue_size: int = attrs.field(default=1024, validator=positive)
    #: An async event listener call that takes longer is cancelled and counted.
    listener_timeout_seconds: float = attrs.field(default=30.0, validator=positive)
    #: The whole shutdown (sessions, events, shutdown hooks, providers) takes at most this.
    shutdown_grace_seconds: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: A plugin's registration or startup hook that takes longer stops start-up.
    startup_timeout_seconds: float = attrs.field(default=300.0, validator=positive)
    #: A plugin's route that takes longer to answer gets 504 (and counts as a fault).
    route_timeout_seconds: float = attrs.field(default=60.0, validator=positive)
    #: Supervisor restart intensity: at most this many restarts ...
    restart_intensity: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    #: ... within this many seconds, or the supervisor gives up and escalates.
    restart_period_seconds: float = attrs.field(default=10.0, validator=positive)
    #: The Redis that the servers of one deployment share (`redis://` or
    #: `rediss://`): the cluster plugin, and the cache and keys plugins when
    #: their own `redis_url` is not set, use it. Empty: none.
    redis_url: str = attrs.field(default="", validator=lambda _, __, value: _check_redis_url(value))
    log_level: str = attrs.field(
        default="info",
        validator=attrs.validators.in_(["debug", "info", "warning", "error"]),
    )
    #: "console": one readable line per event; "json": JSON lines.
    log_format: str = attrs.field(default="console", validator=attrs.validators.in_(["console", "json"]))


@attrs.frozen
class PluginEntry:
    """One `[plugins.NAME]` table: the plugin's name, whether it runs, its raw settings."""

    name: str
    enabled: bool
    settings: dict[str, Any]
    #: Position in the file; the order middlewares compose and hooks run in.
    order: int


@attrs.frozen
class StreamvisorConfig:
    source: str
    server: ServerSettings
    plugins: tuple[PluginEntry, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str, env: dict[str, str] | None = None) -> "StreamvisorConfig":
        data = interpolate(data, source=source, env=os.environ if env is None else env)
        unknown = set(data) - {"server", "plugins"}
        if unknown:
            raise ConfigError(source, sorted(unknown)[0], "one of the tables [server] or [plugins.NAME]", "an unknown key")
        server_table = data.get("server", {})
        if not isinstance(server_table, dict):
            raise ConfigError(source, "server", "a table", describe(server_table))
        server = build_settings(ServerSettings, server_table, source=source, prefix="server")
        plugins_table = data.get("plugins", {})
        if not isinstance(plugins_table, dict):
            raise ConfigError(source, "plugins", "a table of plugin tables", describe(plugins_table))
        entries = []
        for order, (name, table) in enumerate(plugins_table.items()):
            key = f"plugins.{name}"
            if not isinstance(table, dict):
                raise ConfigError(source, key, "a table", describe(table))
            table = dict(table)
            enabled = table.pop("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(source, f"{key}.enabled", "true or false", describe(enabled))
            entries.append(PluginEntry(name=name, enabled=enabled, settings=table, order=order))
        return cls(source=source, server=server, plugins=tuple(entries))

    def with_plugin(self, name: str, settings: dict[str, Any]) -> "StreamvisorConfig":
        """A copy with plugin `name` enabled and set to `settings` (replacing any entry)."""
        kept = [p for p in self.plugins if p.name != name]
        entry = PluginEntry(name=name, enabled=True, settings=settings, order=len(kept))
        return attrs.evolve(self, plugins=tuple(kept) + (entry,))

    def without_plugin(self, name: str) -> "StreamvisorConfig":
        return attrs.evolve(self, plugins=tuple(p for p in self.plugins if p.name != name))


def interpolate(value: Any, *, source: str, env: Any, key: str = "") -> Any:
    """Replace `${NAME}` and `${NAME:-default}` in every string of a TOML value."""
    if isinstance(value, dict):
        return {k: interpolate(v, source=source, env=env, key=f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, source=source, env=env, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(source, key, f"the environment variable {name} to be set", "it unset")

        return _ENV_REF.sub(replace, value)
    return value


def load_config(path: str | os.PathLike[str]) -> StreamvisorConfig:
    """Read and validate a plugins.toml file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "a readable plugins.toml", "no such file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", "valid TOML", str(exc)) from None
    return StreamvisorConfig.from_dict(data, source=source)
