"""docs/hooks.md and hooks/specs.py stay in step, as datasette's tests/test_docs.py
keeps its plugin_hooks.rst in step with its hookspecs.

Every hook spec (a function of `streamvisor.hooks.specs` carrying the
`streamvisor_spec` marker attribute) must have a docstring and exactly one heading
``## NAME(ARGS)`` in docs/hooks.md, with ARGS as `inspect.signature` prints them,
under the phase heading (``# Lifecycle hooks``, ...) named by the ``# -- phase --``
comment it sits under in specs.py. Every ``## NAME(...)`` heading must name an
existing hook, so documentation of a removed or renamed hook fails too.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from streamvisor.hooks import specs
from streamvisor.hooks.markers import PROJECT

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"

_SPEC_MARKER = f"{PROJECT}_spec"
_PHASE_COMMENT = re.compile(r"^# -- (?P<phase>[A-Za-z][\w ]*?) -+\s*$")
_HOOK_HEADING = re.compile(r"^## (?P<name>[A-Za-z_]\w*)\((?P<args>.*)\)\s*$")
_PHASE_HEADING = re.compile(r"^# (?P<phase>.+?) hooks\s*$")


def _specs() -> dict[str, object]:
    return {
        name: fn
        for name, fn in inspect.getmembers(specs, inspect.isfunction)
        if hasattr(fn, _SPEC_MARKER)
    }


SPECS = _specs()


def _signature_heading(name: str) -> str:
    return f"## {name}{inspect.signature(SPECS[name])}"


def _spec_phases() -> dict[str, str | None]:
    """Each spec's phase: the nearest `# -- phase ---` comment above it in specs.py."""
    lines = inspect.getsource(specs).splitlines()
    phases = {}
    for name, fn in SPECS.items():
        start = inspect.getsourcelines(fn)[1] - 1  # 0-based line of the first decorator
        phase = None
        for line in reversed(lines[:start]):
            match = _PHASE_COMMENT.match(line)
            if match:
                phase = match["phase"].strip().lower()
                break
        phases[name] = phase
    return phases


def _doc_headings() -> list[tuple[str, str, str | None]]:
    """(name, heading line, phase section) of every ``## NAME(...)`` heading in the
    docs, outside fenced code blocks."""
    if not DOCS.exists():
        return []
    headings = []
    phase = None
    fenced = False
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("# "):
            match = _PHASE_HEADING.match(line)
            phase = match["phase"].strip().lower() if match else None
            continue
        match = _HOOK_HEADING.match(line)
        if match:
            headings.append((match["name"], line.rstrip(), phase))
    return headings


HEADINGS = _doc_headings()


def test_specs_are_found():
    assert SPECS, f"no function of {specs.__name__} carries the {_SPEC_MARKER!r} attribute"


def test_docs_exist():
    assert DOCS.exists(), f"{DOCS} is missing"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_has_a_docstring(name):
    doc = inspect.getdoc(SPECS[name])
    assert doc and doc.strip(), f"hook spec {name} has no docstring"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_is_documented_with_its_signature(name):
    expected = _signature_heading(name)
    found = [line for hook, line, _ in HEADINGS if hook == name]
    assert found, f"docs/hooks.md has no heading for hook {name}: expected the line {expected!r}"
    assert found == [expected], (
        f"docs/hooks.md documents hook {name} as {found!r}; the spec's signature is {expected!r} "
        "(exactly one such heading, please)"
    )


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_is_documented_under_its_phase(name):
    phase = _spec_phases()[name]
    assert phase, f"hook spec {name} is under no '# -- phase ---' comment in hooks/specs.py"
    sections = [section for hook, _, section in HEADINGS if hook == name]
    assert sections, f"docs/hooks.md has no heading for hook {name}"
    assert sections == [phase], (
        f"hook {name} belongs to the {phase!r} phase in hooks/specs.py, so its heading belongs under "
        f"'# {phase.capitalize()} hooks' in docs/hooks.md (found under: {sections!r})"
    )


@pytest.mark.parametrize(
    "name, heading", [(name, line) for name, line, _ in HEADINGS], ids=[name for name, _, _ in HEADINGS]
)
def test_documented_hook_exists(name, heading):
    assert name in SPECS, (
        f"docs/hooks.md documents {heading!r}, but hooks/specs.py has no hook {name!r} "
        f"(the hooks are: {', '.join(sorted(SPECS))})"
    )


# -- the start-up order, the built-ins and their pages ---------------------------------

README = DOCS.parent.parent / "README.md"
PLUGIN_DOCS = DOCS.parent / "plugins"


def _numbered_list_after(text: str, heading: str) -> str:
    """The numbered list that follows the line `heading`."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    out = []
    for line in lines[start:]:
        if not line.strip() and out and not out[-1].strip():
            break
        if line and not line[0].isdigit() and not line.startswith("   ") and out:
            break
        out.append(line)
    return "\n".join(out)


def _documented_order(heading: str) -> list[str]:
    listed = _numbered_list_after(DOCS.read_text(encoding="utf-8"), heading)
    names = []
    for name in re.findall(r"`([a-z_]+)`", listed):
        if name in SPECS and name != "on_event" and name not in names:
            names.append(name)
    return names


class EveryHook:
    """Implements every hook and records the order the runtime calls them in."""

    def __init__(self):
        self.calls = []

    def _note(self, name):
        if name not in self.calls:
            self.calls.append(name)


def _recording_plugin():
    plugin = EveryHook()
    from streamvisor.hooks import hookimpl

    for name in SPECS:
        if name == "on_event":
            continue

        def make(name):
            def impl(runtime):
                plugin._note(name)

            impl.__name__ = name
            return hookimpl(specname=name)(impl)

        setattr(plugin, name, make(name))
    return plugin


async def test_the_runtime_calls_hooks_in_the_documented_order():
    from streamvisor.core.runtime import Runtime

    from .conftest import make_config

    plugin = _recording_plugin()
    config = make_config("[plugins.every]\n")
    async with Runtime.open(config, plugins={"every": plugin}):
        started = list(plugin.calls)
    assert started == _documented_order("Start-up, as `Runtime.open` runs it:"), "docs/hooks.md lists the start-up order"
    assert plugin.calls[len(started):] == ["shutdown"]
    assert set(plugin.calls) == set(SPECS) - {"on_event"}, "every hook but on_event was called"


def _readme_builtins() -> list[str]:
    """The plugin names of the README's table of built-in plugins."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| plugin | what it adds | doc |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(re.match(r"\| `([\w-]+)` \|", line)[1])
    return rows


def test_the_readme_lists_every_built_in_plugin():
    from streamvisor.hooks import BUILTIN_PLUGINS

    assert _readme_builtins() == list(BUILTIN_PLUGINS)


@pytest.mark.parametrize("name", sorted(__import__("streamvisor.hooks", fromlist=["BUILTIN_PLUGINS"]).BUILTIN_PLUGINS))
def test_every_built_in_plugin_has_its_page(name):
    page = PLUGIN_DOCS / f"{name}.md"
    assert page.exists(), f"the built-in plugin {name} has no page at docs/plugins/{name}.md"
    assert f"`[plugins.{name}]`" in page.read_text(encoding="utf-8"), f"docs/plugins/{name}.md does not say how to enable it"


def test_every_plugin_in_plugins_toml_has_its_page():
    from streamvisor.config import load_config

    config = load_config(DOCS.parent.parent / "plugins.toml")
    missing = [entry.name for entry in config.plugins if not (PLUGIN_DOCS / f"{entry.name}.md").exists()]
    assert missing == []


def test_no_page_for_a_plugin_that_does_not_exist():
    from streamvisor.hooks import BUILTIN_PLUGINS

    pages = sorted(p.stem for p in PLUGIN_DOCS.glob("*.md"))
    assert [p for p in pages if p not in BUILTIN_PLUGINS] == []
