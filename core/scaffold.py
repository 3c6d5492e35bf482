"""`streamvisor new-plugin NAME`: write a ready third-party plugin package.

The package is a working plugin on the public contract (`streamvisor.hooks`)
that shows each kind of extension once: an event type, a middleware that sets a
response header, a per-session chunk transformer, a route and a status panel.
Its tests use `streamvisor.testing`; `pip install -e '.[test]'` and `pytest`
pass as written. The plugin counts the words of every answer.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from streamvisor.hooks.markers import CONTRACT_VERSION

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class ScaffoldError(Exception):
    """The plugin cannot be written (a bad name, an existing folder)."""


PYPROJECT = Template('''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "streamvisor-$name"
version = "0.1.0"
description = "A streamvisor plugin: $name."
requires-python = ">=3.11"
dependencies = ["streamvisor", "attrs>=23.2"]

[project.optional-dependencies]
test = ["pytest>=8", "openai>=1.40"]

# streamvisor finds the plugin here; it runs only when plugins.toml has [plugins.$name].
[project.entry-points.streamvisor]
$name = "$module:$cls"

[tool.setuptools]
py-modules = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
''')

MODULE = Template('''"""The `$name` streamvisor plugin: counts the words of every answer.

It shows each kind of extension once, all on the public contract
(`streamvisor.hooks`, contract $contract):

- an event type, `$name.counted`, emitted when an answer ends;
- a middleware that sets a response header on every completion;
- a per-session chunk transformer that counts words, even when a word is split
  across chunks (its state is the session's own and ends with it);
- a route, `GET /$name/stats`;
- a status panel, `stats`, which the admin plugin shows on /admin/status.

Enable it in plugins.toml::

    [plugins.$name]
    header = "X-Words"      # the response header it sets (the default)
"""

from __future__ import annotations

from typing import Any

import attrs

from streamvisor.hooks import Delta, Session, hookimpl


@attrs.frozen
class Settings:
    #: The response header that says the words are being counted.
    header: str = "X-Words"


class WordCounter:
    """One session's count: a transform that remembers, between chunks,
    whether the last chunk ended inside a word."""

    def __init__(self, plugin: "$cls", session: Session) -> None:
        self.plugin = plugin
        self.session = session
        self.words = 0
        self.in_word = False

    def transform(self, delta: Delta) -> Delta:
        for char in delta.content or "":
            starts = not char.isspace()
            if starts and not self.in_word:
                self.words += 1
            self.in_word = starts
        if delta.finish_reason is not None:
            self.plugin.sessions += 1
            self.plugin.words += self.words
            self.session.emit("$name.counted", words=self.words)
        return delta


class $cls:
    Settings = Settings
    streamvisor_contract = "$contract"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = 0
        self.words = 0

    @hookimpl
    def register_event_types(self, register: Any) -> None:
        register("$name.counted", "an answer ended; data: words")

    @hookimpl
    def register_middleware(self, register: Any) -> None:
        register(self.middleware)

    def middleware(self, request: Any, call_next: Any, session: Session) -> Any:
        # A plain function that returns the rest of the chain: it costs
        # nothing per chunk.
        session.set_header(self.settings.header, "counted")
        return call_next(request)

    @hookimpl
    def register_chunk_transformers(self, register: Any) -> None:
        register(lambda session: WordCounter(self, session).transform)

    @hookimpl
    def register_routes(self, register: Any) -> None:
        async def stats() -> dict[str, Any]:
            return self.stats()

        register("/$name/stats", stats)

    @hookimpl
    def register_status_panels(self, register: Any) -> None:
        register("stats", self.stats)

    def stats(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "words": self.words}
''')

CONFTEST = Template('''"""The plugin under test, for streamvisor.testing's fixtures (installed with
streamvisor): `streamvisor_server` runs a server with the tables below and the
scripted provider's models (`scripted` answers "The quick brown fox jumps over
the lazy dog.", `echo` repeats the last user message)."""

import pytest


@pytest.fixture
def streamvisor_toml():
    return """
[plugins.$name]
header = "X-Words"
"""
''')

TESTS = Template('''"""The $name plugin against a real server, through the official openai client."""

import trio


def ask(client, model="scripted", content="go"):
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}])


def test_the_middleware_sets_its_header(openai_client):
    raw = ask(openai_client)
    assert raw.headers["X-Words"] == "counted"


def test_words_are_counted_across_chunks(openai_client, streamvisor_events):
    # echo streams the message word by word; the counter sees each word once.
    reply = ask(openai_client, "echo", "one two  three\\nfour").parse()
    assert reply.choices[0].message.content == "one two  three\\nfour"
    (event,) = streamvisor_events.wait_for_type("$name.counted")
    assert event.data == {"words": 4}


def test_the_route_shows_the_totals(streamvisor_server, openai_client):
    ask(openai_client)
    ask(openai_client, "echo", "hello there")
    streamvisor_server.events.wait_for_type("$name.counted", count=2)
    stats = streamvisor_server.http().get("/$name/stats").json()
    assert stats == {"sessions": 2, "words": 11}


def test_the_status_panel_is_published(streamvisor_server, openai_client):
    ask(openai_client)
    streamvisor_server.events.wait_for_type("$name.counted")
    panels = streamvisor_server.run(streamvisor_server.runtime.status_panels)
    assert panels["$name"]["stats"] == {"sessions": 1, "words": 9}


def test_a_stopped_answer_is_not_counted(streamvisor_server, openai_client):
    stream = openai_client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go"}], stream=True)
    next(iter(stream))
    stream.close()  # the client leaves: the session ends without a finish chunk
    streamvisor_server.events.wait_for_type("disconnected")
    assert streamvisor_server.events.of("$name.counted") == []
''')

README = Template('''# streamvisor-$name

A [streamvisor](https://github.com/) plugin: counts the words of every answer,
and shows each kind of plugin extension once (an event type, a middleware that
sets a header, a per-session chunk transformer, a route and a status panel).

## Use it

```sh
pip install -e .
```

```toml
# plugins.toml
[plugins.$name]
header = "X-Words"
```

`GET /$name/stats` answers `{"sessions": ..., "words": ...}`; every completion
carries `X-Words: counted`; listeners get a `$name.counted` event per answer.

## Develop it

```sh
pip install -e '.[test]'    # in an environment where streamvisor is installed
pytest
```

The tests use the fixtures of `streamvisor.testing`, installed with streamvisor:
`streamvisor_server` (a real server on a loopback port with this plugin and a
scripted provider), `openai_client`, `streamvisor_events` and `fake_upstream`.
The plugin contract (hooks, public API, stability) is streamvisor's
`docs/hooks.md`; written for contract $contract.
''')


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package `streamvisor-NAME` under `parent`; its folder."""
    if not _NAME.fullmatch(name):
        raise ScaffoldError(
            f"the plugin name {name!r} must be 1 to 40 lower-case letters, digits, '-' or '_', starting with a letter"
        )
    module = "streamvisor_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name)) + "Plugin"
    folder = parent / f"streamvisor-{name}"
    if folder.exists():
        raise ScaffoldError(f"{folder} exists already; choose another name or folder (--dir)")
    values = {"name": name, "module": module, "cls": cls, "contract": CONTRACT_VERSION}
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}.py": MODULE,
        "README.md": README,
        "tests/conftest.py": CONFTEST,
        f"tests/test_{module.removeprefix('streamvisor_')}.py": TESTS,
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(values), encoding="utf-8")
    return folder
