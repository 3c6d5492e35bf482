"""The plugin manager: which plugins run, in what order, with which settings.

A plugin runs only when plugins.toml names it. The name is looked up first among
the built-ins (`BUILTIN_PLUGINS`), then in the entry-point group `streamvisor`, so a
third-party package is enabled exactly like a built-in. A plugin is either a module
of hook implementations, or a class whose instances carry them; a class may declare
its settings as an attrs class in a `Settings` attribute, and is then constructed
with the validated settings of its table.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from typing import Any, Callable, Iterator

import attrs
import pluggy

from streamvisor.config import ConfigError, StreamvisorConfig, build_settings

from . import specs
from .markers import CONTRACT_VERSION, PROJECT

log = logging.getLogger("streamvisor.plugins")

ENTRY_POINT_GROUP = "streamvisor"

#: Built-in plugins by the name plugins.toml gives them. Like any plugin, each
#: runs only when plugins.toml names it.
BUILTIN_PLUGINS: dict[str, str] = {
    "local": "streamvisor.plugins.local:LocalPlugin",
    "openai": "streamvisor.plugins.openai_upstream:OpenAIPlugin",
    "scripted": "streamvisor.plugins.scripted:ScriptedPlugin",
    "reasoning": "streamvisor.plugins.reasoning:ReasoningPlugin",
    "cache": "streamvisor.plugins.cache:CachePlugin",
    "retry": "streamvisor.plugins.retry:RetryPlugin",
    "pricing": "streamvisor.plugins.pricing:PricingPlugin",
    "keys": "streamvisor.plugins.keys:KeysPlugin",
    "files": "streamvisor.plugins.files:FilesPlugin",
    "store": "streamvisor.plugins.store:StorePlugin",
    "cluster": "streamvisor.plugins.cluster:ClusterPlugin",
    "responses": "streamvisor.plugins.responses:ResponsesPlugin",
    "webhooks": "streamvisor.plugins.webhooks:WebhooksPlugin",
    "console": "streamvisor.plugins.console:ConsolePlugin",
    "otel": "streamvisor.plugins.otel:OtelPlugin",
    "router": "streamvisor.plugins.router:RouterPlugin",
    "usage": "streamvisor.plugins.usage:UsagePlugin",
    "monitor": "streamvisor.plugins.monitor:MonitorPlugin",
    "health": "streamvisor.plugins.health:HealthPlugin",
    "admin": "streamvisor.plugins.admin:AdminPlugin",
}

#: The operational stack, in order, that `streamvisor serve --upstream` runs
#: without a config file; the repository's plugins.toml enables the same.
#: Order matters: reasoning splits <think> before the monitor measures chunks,
#: the cache answers before retries are tried.
DEFAULT_STACK: tuple[str, ...] = ("reasoning", "cache", "retry", "pricing", "responses", "webhooks", "files", "store", "console", "usage", "monitor", "health", "admin")


def _version() -> str:
    try:
        return importlib.metadata.version("streamvisor")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


@attrs.define
class LoadedPlugin:
    name: str
    version: str
    origin: str  # "built-in" or the distribution that provides the entry point
    plugin: Any
    order: int
    settings: Any = None
    #: The contract version the plugin says it was written for (None: it does not say).
    contract: str | None = None

    @property
    def hooks(self) -> list[str]:
        names = []
        for attr in dir(self.plugin):
            fn = getattr(self.plugin, attr, None)
            if callable(fn) and hasattr(fn, f"{PROJECT}_impl"):
                names.append(attr)
        return sorted(names)


@attrs.frozen
class HookCall:
    """One plugin's implementation of one hook, ready to call with keyword args."""

    plugin_name: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]

    def __call__(self, **kwargs: Any) -> Any:
        return self.function(*[kwargs[name] for name in self.argnames])


class PluginHost:
    """Loads the configured plugins into a pluggy manager and calls their hooks in
    plugins.toml order."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(specs)
        self.plugins: dict[str, LoadedPlugin] = {}
        self._owners: tuple[dict[Any, str], dict[str, str]] | None = None

    # -- loading -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: StreamvisorConfig, extra: dict[str, Any] | None = None) -> "PluginHost":
        """Load every enabled plugin named in `config`.

        `extra` maps names to plugin objects or classes that are used instead of a
        lookup (tests register plugins this way; they still need a table in the
        config to run).
        """
        host = cls()
        extra = extra or {}
        entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        for entry in config.plugins:
            if not entry.enabled:
                continue
            key = f"plugins.{entry.name}"
            if entry.name in extra:
                target, version, origin = extra[entry.name], _version(), "registered"
            elif entry.name in BUILTIN_PLUGINS:
                target, version, origin = _import(BUILTIN_PLUGINS[entry.name]), _version(), "built-in"
            elif entry.name in entry_points:
                ep = entry_points[entry.name]
                try:
                    target = ep.load()
                except Exception as exc:
                    raise ConfigError(config.source, key, f"an importable plugin ({ep.value})", f"{type(exc).__name__}: {exc}") from exc
                dist = ep.dist
                version = dist.version if dist else "unknown"
                origin = dist.metadata["Name"] if dist else "entry point"
            else:
                known = sorted(set(BUILTIN_PLUGINS) | set(entry_points))
                raise ConfigError(
                    config.source,
                    key,
                    f"a built-in plugin or one installed in entry-point group '{ENTRY_POINT_GROUP}' ({', '.join(known)})",
                    f"'{entry.name}', which is neither",
                )
            contract = _check_contract(target, config.source, key)
            plugin, settings = _instantiate(target, entry.settings, config.source, key)
            try:
                host.pm.register(plugin, name=entry.name)
            except pluggy.PluginValidationError as exc:
                raise ConfigError(config.source, key, "a plugin whose hooks match the contract", str(exc)) from None
            host.plugins[entry.name] = LoadedPlugin(entry.name, version, origin, plugin, entry.order, settings, contract)
        host._check(config.source)
        return host

    def _check(self, source: str) -> None:
        """Refuse what would otherwise be silently ignored: a hookimpl with a name
        no hook has (a typo), and pluggy wrappers (the runtime composes
        middleware itself; see register_middleware)."""
        for name, loaded in self.plugins.items():
            for hook_caller in self.pm.get_hookcallers(loaded.plugin) or ():
                for impl in hook_caller.get_hookimpls():
                    if impl.plugin_name == name and (impl.hookwrapper or impl.wrapper):
                        raise ConfigError(
                            source,
                            f"plugins.{name}",
                            f"plain hook implementations ({hook_caller.name} is a wrapper; use register_middleware to wrap the provider call)",
                            "a pluggy wrapper",
                        )
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = getattr(exc, "plugin", None)
            name = self.pm.get_name(plugin) if plugin is not None else "?"
            raise ConfigError(source, f"plugins.{name}", "hook implementations named after hooks of the contract", str(exc)) from None

    # -- calling -----------------------------------------------------------------

    def implementations(self, hook_name: str) -> list[HookCall]:
        """The implementations of `hook_name`, in plugins.toml order."""
        hook = getattr(self.pm.hook, hook_name)
        order = {name: p.order for name, p in self.plugins.items()}
        impls = sorted(hook.get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, 1 << 30))
        return [HookCall(impl.plugin_name, impl.function, tuple(impl.argnames)) for impl in impls]

    def __iter__(self) -> Iterator[LoadedPlugin]:
        return iter(sorted(self.plugins.values(), key=lambda p: p.order))

    # -- whose code was it ---------------------------------------------------------

    def blame(self, exc: BaseException) -> str | None:
        """The plugin whose code raised `exc`: the one that owns the innermost
        frame of its traceback owned by any plugin (library and core frames are
        passed over). Used on the failure path only, so it costs nothing while
        streams work."""
        if self._owners is None:
            self._owners = self._index_code()
        codes, modules = self._owners
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            owner = codes.get(frame.f_code) or modules.get(frame.f_globals.get("__name__", ""))
            if owner is not None:
                return owner
        return None

    def _index_code(self) -> tuple[dict[Any, str], dict[str, str]]:
        """Code objects of each plugin's class (its methods and the functions
        defined in them), and the modules that hold one plugin only."""
        codes: dict[Any, str] = {}
        by_module: dict[str, set[str]] = {}
        for loaded in self.plugins.values():
            plugin = loaded.plugin
            module = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__
            by_module.setdefault(module, set()).add(loaded.name)
            if inspect.ismodule(plugin):
                continue
            for cls in type(plugin).__mro__[:-1]:
                for value in vars(cls).values():
                    function = getattr(value, "__func__", value)
                    code = getattr(function, "__code__", None)
                    if code is not None:
                        _walk_code(code, loaded.name, codes)
        modules = {module: next(iter(names)) for module, names in by_module.items() if len(names) == 1}
        return codes, modules


def _walk_code(code: Any, owner: str, codes: dict[Any, str]) -> None:
    codes.setdefault(code, owner)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _walk_code(const, owner, codes)


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _check_contract(target: Any, source: str, key: str) -> str | None:
    """The contract version a plugin declares (`streamvisor_contract`); a plugin
    written for another major version, or a newer minor one, cannot run here."""
    declared = getattr(target, "streamvisor_contract", None)
    if declared is None:
        return None
    ours = CONTRACT_VERSION.split(".")
    parts = str(declared).split(".")
    if not all(p.isdigit() for p in parts) or len(parts) > 2:
        raise ConfigError(source, key, "a plugin whose streamvisor_contract is a version like '1.0'", repr(declared))
    major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if major != int(ours[0]) or minor > int(ours[1]):
        raise ConfigError(
            source,
            key,
            f"a plugin written for the plugin contract {ours[0]}.x up to {CONTRACT_VERSION} (this streamvisor's)",
            f"one written for contract {declared}",
        )
    return str(declared)


def _instantiate(target: Any, table: dict[str, Any], source: str, key: str) -> tuple[Any, Any]:
    if inspect.isclass(target):
        settings_cls = getattr(target, "Settings", None)
        if settings_cls is not None and attrs.has(settings_cls):
            settings = build_settings(settings_cls, table, source=source, prefix=key)
            return target(settings), settings
        if table:
            raise ConfigError(source, f"{key}.{next(iter(table))}", "no settings (this plugin takes none)", "a setting")
        return target(), None
    if table:
        raise ConfigError(source, f"{key}.{next(iter(table))}", "no settings (this plugin takes none)", "a setting")
    return target, None
