"""The public plugin contract: the `hookimpl` marker, the hook specs, the plugin host.

A third-party plugin needs only::

    from streamvisor.hooks import hookimpl
"""

from .manager import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, LoadedPlugin, PluginHost
from .markers import hookimpl, hookspec, listens_to

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "LoadedPlugin", "PluginHost", "hookimpl", "hookspec", "listens_to"]
