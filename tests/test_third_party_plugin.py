"""The plugin contract seen from outside: a separately installed package.

`tests/example_plugin` is a distribution of its own (streamvisor-example-plugin
0.3.0) that registers `example` in the entry-point group `streamvisor`. It must be
installed in the environment (``pip install -e tests/example_plugin``). These tests
never hand the plugin to the server: they name `[plugins.example]` in the config,
exactly as a user would, and streamvisor has to find it by its entry point.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from streamvisor.config import ConfigError, load_config
from streamvisor.hooks import CONTRACT_VERSION

from .conftest import ServerThread, start_server

try:
    importlib.metadata.distribution("streamvisor-example-plugin")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - an environment fault, not a skip
    pytest.fail(
        "streamvisor-example-plugin is not installed: run `.venv/bin/pip install -e tests/example_plugin`",
        pytrace=False,
    )

EXAMPLE = """
[plugins.example]
greeting = "Howdy"
"""

# A second plugin, so that a server without `example` still serves something.
SCRIPTED = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
"""

STREAMVISOR = Path(sys.executable).with_name("streamvisor")


def streamvisor(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed `streamvisor` command as a user would."""
    assert STREAMVISOR.exists(), f"{STREAMVISOR} is missing: is streamvisor installed in this venv?"
    return subprocess.run([str(STREAMVISOR), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def example_server():
    with start_server(EXAMPLE) as server:
        yield server


# -- configured: the plugin serves its model and its route ---------------------------


def test_configured_by_name_it_is_found_through_its_entry_point(example_server):
    # Its own behaviour is tested by its own suite (tests/example_plugin/tests,
    # on the kit); here: found by name, as a user would configure it.
    models = {m.id: m for m in example_server.openai().models.list()}
    assert models["example-reverse"].owned_by == "example"
    reply = example_server.openai().chat.completions.create(model="example-reverse", messages=[{"role": "user", "content": "ab cd"}])
    assert reply.choices[0].message.content == "Howdy dc ba"
    status = example_server.call(lambda: {p["name"]: p for p in example_server.runtime.plugin_status()})
    assert status["example"]["origin"] == "streamvisor-example-plugin" and status["example"]["contract"] == "1.0"


def test_the_plugins_command_lists_it_with_its_version_and_hooks(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text(EXAMPLE)
    result = streamvisor("plugins", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"this streamvisor implements plugin contract {CONTRACT_VERSION}"
    rows = {line.split()[0]: line.split(None, 4) for line in lines[1:-1]}
    assert rows["example"] == ["example", "0.3.0", "streamvisor-example-plugin", "1.0", "register_providers, register_routes, register_status_panels"]


# -- a wrong setting stops start-up, naming where and what ----------------------------


def test_a_wrong_setting_type_stops_start_up_naming_file_key_expected_and_found(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 0\n\n[plugins.example]\ngreeting = 5\n")
    with pytest.raises(RuntimeError) as caught:
        ServerThread(load_config(config)).start()
    group = caught.value.__cause__
    errors = group.split(ConfigError)[0].exceptions if isinstance(group, BaseExceptionGroup) else (group,)
    assert len(errors) == 1 and isinstance(errors[0], ConfigError), repr(group)
    assert str(errors[0]) == f"{config}: plugins.example.greeting: expected a string, found 5 (an integer)"


def test_the_serve_command_refuses_a_wrong_setting_type(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 0\n\n[plugins.example]\ngreeting = 5\n")
    result = streamvisor("serve", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{config}: plugins.example.greeting: expected a string, found 5 (an integer)" in result.stderr


# -- not configured, or switched off: installed code does not run ----------------------


@pytest.mark.parametrize("example_table", ["", "[plugins.example]\nenabled = false\n"], ids=["absent", "disabled"])
def test_installed_but_not_enabled_serves_nothing(example_table):
    with start_server(SCRIPTED + example_table) as server, server.http() as http:
        ids = {m.id for m in server.openai().models.list()}
        assert ids == {"fox"}
        with pytest.raises(openai.NotFoundError):
            server.openai().chat.completions.create(model="example-reverse", messages=[{"role": "user", "content": "x"}])
        assert http.get("/example/hello").status_code == 404
        assert "example" not in [p["name"] for p in server.runtime.plugin_status()]


@pytest.mark.parametrize(
    "example_table, disabled_line",
    [("", None), ("[plugins.example]\nenabled = false\n", "disabled in {config}: example")],
    ids=["absent", "disabled"],
)
def test_the_plugins_command_does_not_load_it_unless_enabled(tmp_path, example_table, disabled_line):
    config = tmp_path / "plugins.toml"
    config.write_text(SCRIPTED + example_table)
    result = streamvisor("plugins", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:] if not line.startswith(("disabled", "this streamvisor"))]
    assert names == ["scripted"]
    if disabled_line:
        assert disabled_line.format(config=config) in result.stdout.splitlines()
