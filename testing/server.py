"""A real streamvisor server on an ephemeral loopback port, in a thread.

`start_server(toml, plugins=...)` runs the whole server (runtime and hypercorn)
in a thread with its own trio loop, so that tests talk to it with ordinary
blocking clients, the official `openai` client among them. `server.call(fn)` runs
`fn` inside the server's loop, to look at its runtime without racing it.
"""

from __future__ import annotations

import queue
import threading
import time
import tomllib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import openai
import trio

from streamvisor.config import StreamvisorConfig
from streamvisor.core.cli import Listening, serve

__all__ = ["ServerThread", "make_config", "start_server"]


class ServerThread:
    def __init__(self, config: StreamvisorConfig, plugins: dict[str, Any] | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.url = ""
        self.runtime: Any = None
        #: The quart app, for tests that look at its routes (`server.call(...)`).
        self.app: Any = None
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
                self.url, self.runtime, self.app = listening.url, listening.runtime, listening.app
                self._ready.put(None)

        try:
            trio.run(run)
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.put(exc)

    def start(self, timeout: float = 120) -> "ServerThread":
        self._thread.start()
        outcome = self._ready.get(timeout=timeout)
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

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the async function `fn(*args)` in the server's trio loop and
        return its result (`server.run(server.runtime.status_panels)`)."""
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> float:
        """Poll `predicate` inside the server loop; return the seconds it took."""
        t0 = time.perf_counter()
        while True:
            if self.call(predicate):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            time.sleep(interval)

    @property
    def base(self) -> str:
        """The OpenAI base URL (`.../v1`)."""
        return self.url + "/v1"

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """An `openai.OpenAI` client of this server (no retries of its own), closed with the server."""
        client = openai.OpenAI(base_url=self.base, api_key=kwargs.pop("api_key", "unused"), max_retries=kwargs.pop("max_retries", 0), **kwargs)
        self._clients.append(client)
        return client

    def http(self, **kwargs: Any) -> httpx.Client:
        """An `httpx.Client` with this server as its base URL, closed with the server."""
        client = httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)
        self._clients.append(client)
        return client


def make_config(toml: str | dict[str, Any] = "", source: str = "test.toml", **server: Any) -> StreamvisorConfig:
    """A config from plugins.toml text (or a dict), on port 0, logging at debug;
    keyword arguments set `[server]` settings."""
    data = tomllib.loads(toml) if isinstance(toml, str) else dict(toml)
    data.setdefault("server", {})
    data["server"].setdefault("port", 0)
    data["server"].setdefault("log_level", "debug")
    data["server"].update(server)
    return StreamvisorConfig.from_dict(data, source=source)


@contextmanager
def start_server(toml: str | dict[str, Any] = "", plugins: dict[str, Any] | None = None, **server: Any) -> Iterator[ServerThread]:
    """Run a server for `toml` until the block ends. `plugins` maps table names
    to plugin objects or classes used instead of looking the names up."""
    thread = ServerThread(make_config(toml, **server), plugins).start()
    try:
        yield thread
    finally:
        thread.stop()
