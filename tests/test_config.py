"""plugins.toml: interpolation, enabling, and errors that say exactly what is wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from streamvisor.config import ConfigError, StreamvisorConfig, load_config
from streamvisor.hooks import PluginHost


def _write(tmp_path, text):
    path = tmp_path / "plugins.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path, text, env=None):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config = load_config(path) if env is None else StreamvisorConfig.from_dict(__import__("tomllib").loads(path.read_text()), source=str(path), env=env)
        PluginHost.from_config(config)
    return str(caught.value), str(path)


def test_the_repository_default_is_valid_and_serves_the_local_model():
    from streamvisor.core.cli import DEFAULT_STACK

    config = load_config("plugins.toml")
    host = PluginHost.from_config(config)
    assert [p.name for p in host] == ["local", *DEFAULT_STACK]
    assert [p.name for p in config.plugins if not p.enabled] == ["openai", "scripted", "router", "keys", "cluster", "otel"]


def test_env_interpolation_with_and_without_defaults(tmp_path):
    path = _write(
        tmp_path,
        """
        [plugins.openai]
        [[plugins.openai.upstreams]]
        base_url = "${BASE:-http://127.0.0.1:9/v1}"
        api_key = "${SECRET}"
        """,
    )
    import tomllib

    data = tomllib.loads(path.read_text())
    config = StreamvisorConfig.from_dict(data, source=str(path), env={"SECRET": "sk-123"})
    settings = PluginHost.from_config(config).plugins["openai"].settings
    assert settings.upstreams[0].api_key == "sk-123"
    assert settings.upstreams[0].base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"plugins.openai.upstreams\[0\].api_key: expected the environment variable SECRET to be set"):
        StreamvisorConfig.from_dict(data, source=str(path), env={})


def test_a_wrong_type_names_file_key_expected_and_found(tmp_path):
    message, path = _error(
        tmp_path,
        """
        [plugins.scripted]
        [[plugins.scripted.models]]
        name = "x"
        delay = "soon"
        """,
    )
    assert message == f"{path}: plugins.scripted.models[0].delay: expected a number, found 'soon' (a string)"


def test_an_unknown_key_is_an_error_not_a_silent_default(tmp_path):
    message, path = _error(tmp_path, "[plugins.local]\nmodel_pth = 'x.gguf'\n")
    assert message.startswith(f"{path}: plugins.local.model_pth: expected one of the known keys (")
    assert "model_path" in message and message.endswith("found an unknown key")


def test_an_unknown_plugin_names_what_exists(tmp_path):
    message, _ = _error(tmp_path, "[plugins.nonesuch]\n")
    assert "plugins.nonesuch" in message and "scripted" in message and "found 'nonesuch', which is neither" in message


def test_validators_and_server_settings(tmp_path):
    message, path = _error(tmp_path, "[server]\nport = 70000\n")
    assert message.startswith(f"{path}: server: expected a valid value") and "port" in message
    message, _ = _error(tmp_path, "[server]\nlog_level = 'loud'\n")
    assert "log_level" in message
    message, _ = _error(tmp_path, "[server]\nmax_body_bytes = true\n")
    assert message.endswith("server.max_body_bytes: expected an integer, found true (a boolean)")
    message, _ = _error(tmp_path, "[plugins.local]\nenabled = 'no'\n")
    assert message.endswith("plugins.local.enabled: expected true or false, found 'no' (a string)")
    message, _ = _error(tmp_path, "[plugins]\nlocal = 3\n")
    assert message.endswith("plugins.local: expected a table, found 3 (an integer)")
    message, _ = _error(tmp_path, "[plugins.openai]\n[[plugins.openai.upstreams]]\nname = 'x'\n")
    assert message.endswith("plugins.openai.upstreams[0].base_url: expected a string, found nothing (it is required)")
    upstream = "[plugins.openai]\n[[plugins.openai.upstreams]]\nname = 'x'\n"
    message, _ = _error(tmp_path, upstream + "base_url = 'localhost:8000/v1'\n")
    assert "plugins.openai.upstreams[0]" in message and "base_url must be an http:// or https:// URL with a host" in message
    message, _ = _error(tmp_path, upstream + "base_url = 'http://127.0.0.1:port/v1'\n")
    assert "base_url: Port could not be cast to integer value" in message
    message, _ = _error(tmp_path, upstream + "base_url = 'https://h/v1'\nca_file = '/nowhere/ca.pem'\n")
    assert "ca_file: no file at '/nowhere/ca.pem'" in message
    message, _ = _error(tmp_path, upstream + "base_url = 'http://h/v1'\nheaders = { 'X-A' = \"a\\r\\nHost: evil\" }\n")
    assert "headers: invalid header 'X-A'" in message


def test_syntax_errors_and_missing_files(tmp_path):
    message, path = _error(tmp_path, "[server\n")
    assert message.startswith(f"{path}: (syntax): expected valid TOML")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_enabled_false_switches_a_plugin_off(tmp_path):
    config = load_config(_write(tmp_path, "[plugins.scripted]\nenabled = false\n[plugins.local]\nenabled = false\n"))
    assert list(PluginHost.from_config(config)) == []


def test_serve_refuses_to_start_on_a_bad_setting(tmp_path):
    path = _write(tmp_path, "[plugins.scripted]\n[[plugins.scripted.models]]\nname = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "streamvisor.core.cli", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"streamvisor: configuration error: {path}: plugins.scripted.models[0].name: expected a string, found 1 (an integer)"
    )
