"""The plugin contract seen from outside: a separately installed package.

`tests/example_plugin` is a distribution of its own (streamvisor-example-plugin
0.2.0) that registers `example` in the entry-point group `streamvisor`. It must be
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


def test_its_model_is_listed(example_server):
    models = {m.id: m for m in example_server.openai().models.list()}
    assert "example-reverse" in models
    assert models["example-reverse"].owned_by == "example"


def test_streams_the_last_user_message_reversed_word_by_word_with_usage(example_server):
    stream = example_server.openai().chat.completions.create(
        model="example-reverse",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "stream me backwards"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["Howdy", " sdrawkcab", " em", " maerts"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 4, 13)


def test_max_tokens_cuts_the_reply_with_length(example_server):
    reply = example_server.openai().chat.completions.create(
        model="example-reverse", messages=[{"role": "user", "content": "one two three"}], max_tokens=2
    )
    assert reply.choices[0].message.content == "Howdy eerht"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2


def test_a_request_without_a_user_message_gets_its_400(example_server):
    with pytest.raises(openai.BadRequestError) as caught:
        example_server.openai().chat.completions.create(
            model="example-reverse", messages=[{"role": "system", "content": "nobody asks"}]
        )
    assert "needs a user message" in caught.value.message
    assert caught.value.body["param"] == "messages"


def test_its_route_answers_with_the_configured_greeting(example_server):
    with example_server.http() as http:
        response = http.get("/example/hello")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"plugin": "example", "greeting": "Howdy"}
    assert response.headers["X-Request-ID"]  # plugin routes get the core's headers too


def test_the_plugins_command_lists_it_with_its_version_and_hooks(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text(EXAMPLE)
    result = streamvisor("plugins", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"this streamvisor implements plugin contract {CONTRACT_VERSION}"
    rows = {line.split()[0]: line.split(None, 4) for line in lines[1:-1]}
    assert rows["example"] == ["example", "0.2.0", "streamvisor-example-plugin", "1.0", "register_providers, register_routes"]


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
