"""plugins.toml: reading the file, `${ENV}` interpolation, and turning each table
into the attrs settings class that owns it, with errors that name the file, the key,
what was expected and what was found."""

from .loader import ConfigError, PluginEntry, ServerSettings, StreamvisorConfig, load_config
from .schema import build_settings

__all__ = [
    "ConfigError",
    "PluginEntry",
    "ServerSettings",
    "StreamvisorConfig",
    "build_settings",
    "load_config",
]
