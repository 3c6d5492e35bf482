"""The built-in plugins use nothing a third-party plugin can't: a static check.

A built-in is written exactly like a third party's plugin, so every module under
plugins/ must
- import from streamvisor only `streamvisor.hooks`, and only the names in its
  `__all__` (the documented public API);
- never touch a private name of core: no attribute whose name starts with an
  underscore on anything but its own `self`/`cls`, and on the runtime only the
  documented public attributes;
- never look another plugin up by name: no string equal to another built-in's
  name used as a call argument, a subscript or in a comparison.

The same checks run on the example plugin and on the plugin `streamvisor
new-plugin` writes, which must hold to the contract too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import streamvisor.hooks as public
from streamvisor.hooks import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FILES = sorted((ROOT / "plugins").rglob("*.py"))

#: The Runtime's public API (docs/hooks.md, "The runtime").
RUNTIME_PUBLIC = {
    "config",
    "emit",
    "authenticate",
    "sessions",
    "providers",
    "events",
    "metrics",
    "faults",
    "health_checks",
    "check_health",
    "buffers",
    "status_panels",
    "plugin_status",
    "open_session",
    "routes",
    "store",
    "authenticates",
    "price",
    "instance",
    "instance_id",
    "directory",
    "start_chat",
    "find_session",
    "follow_session",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "plugins").with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return parts[0] if parts else ""


def _own_plugin_names(path: Path) -> set[str]:
    """The plugin names this module may say: its own (a module may be imported
    under several, e.g. openai_upstream is `openai`)."""
    module = "streamvisor.plugins." + _module_name(path)
    return {name for name, target in BUILTIN_PLUGINS.items() if target.split(":")[0].startswith(module)}


def _plugin_ish(expr: ast.AST) -> bool:
    text = ast.unparse(expr)
    return "plugin" in text.lower() or text.endswith((".name", "['name']", '["name"]'))


def violations(path: Path, own_names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    others = set(BUILTIN_PLUGINS) - own_names
    found = []

    def where(node: ast.AST) -> str:
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', '?')}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("streamvisor") and alias.name != "streamvisor.hooks":
                    found.append(f"{where(node)}: imports {alias.name} (only streamvisor.hooks is public)")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("streamvisor"):
            if node.module != "streamvisor.hooks":
                found.append(f"{where(node)}: imports from {node.module} (only streamvisor.hooks is public)")
            else:
                for alias in node.names:
                    if alias.name not in public.__all__:
                        found.append(f"{where(node)}: imports {alias.name}, which is not in streamvisor.hooks.__all__")
        elif isinstance(node, ast.Attribute):
            base = node.value
            base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if node.attr.startswith("_") and not node.attr.startswith("__") and base_name not in ("self", "cls"):
                found.append(f"{where(node)}: touches the private name {node.attr!r} of {base_name or 'an expression'}")
            if base_name == "runtime" and node.attr not in RUNTIME_PUBLIC:
                found.append(f"{where(node)}: uses runtime.{node.attr}, which is not the runtime's public API")
        elif isinstance(node, (ast.Call, ast.Compare, ast.Subscript)):
            # A plugin's name used where plugins are looked up: an argument of a
            # call on something plugin-ish, a key of a plugin-ish mapping, or
            # compared with a plugin-ish name. ("usage" as a dict key is fine.)
            if isinstance(node, ast.Call):
                candidates = list(node.args) + [k.value for k in node.keywords] if _plugin_ish(node.func) else []
            elif isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                candidates = operands if any(_plugin_ish(o) for o in operands if not isinstance(o, ast.Constant)) else []
            else:
                candidates = [node.slice] if _plugin_ish(node.value) else []
            for value in candidates:
                if isinstance(value, ast.Constant) and value.value in others:
                    found.append(f"{where(node)}: names the plugin {value.value!r} (plugins meet through hooks, not by name)")
    return found


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=[str(p.relative_to(ROOT)) for p in PLUGIN_FILES])
def test_a_built_in_plugin_uses_only_the_public_contract(path):
    assert violations(path, _own_plugin_names(path)) == []


def test_the_check_catches_a_back_door(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from streamvisor.core.sessions import Session\n"
        "from streamvisor.hooks import hookimpl, PluginHost\n"
        "def f(runtime, session):\n"
        "    runtime._host.plugins.get('usage')\n"
        "    session._headers['X'] = 'y'\n"
        "    return runtime.supervisor\n"
    )
    found = "\n".join(violations(bad, set()))
    assert "imports from streamvisor.core.sessions" in found
    assert "PluginHost, which is not in streamvisor.hooks.__all__" in found
    assert "private name '_host'" in found and "private name '_headers'" in found
    assert "runtime.supervisor" in found
    assert "names the plugin 'usage'" in found


def test_every_public_name_exists_and_is_documented():
    docs = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    for name in public.__all__:
        assert getattr(public, name) is not None
        assert f"`{name}`" in docs, f"streamvisor.hooks.{name} is public but docs/hooks.md does not mention it"
