"""The `streamvisor` command: serve, chat, plugins, db, new-plugin.

`serve` reads plugins.toml (or builds a config from `--upstream`), binds the
listening socket, starts the runtime and serves the API with hypercorn's trio
worker until SIGINT/SIGTERM; `serve --workers N` runs N such processes on one
socket under a supervisor (core/workers.py).
`chat` runs a completion in-process (or against `--url`) and streams it to the
terminal. `plugins` lists what plugins.toml loads. `new-plugin` writes a plugin package.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import attrs
import trio

from streamvisor.config import ConfigError, StreamvisorConfig, load_config
from streamvisor.hooks.manager import DEFAULT_STACK

from . import hypercorn_patch
from .faults import PluginError
from .logs import configure
from .sessions import unwrap

log = logging.getLogger("streamvisor")

DEFAULT_CONFIG = "plugins.toml"


def build_config(args: argparse.Namespace) -> StreamvisorConfig:
    """The config a command runs with: `--config`, else `--upstream`, else ./plugins.toml."""
    upstreams = getattr(args, "upstream", None) or []
    if args.config:
        config = load_config(args.config)
    elif upstreams:
        config = StreamvisorConfig.from_dict({"plugins": {name: {} for name in DEFAULT_STACK}}, source="--upstream")
    elif Path(DEFAULT_CONFIG).exists():
        config = load_config(DEFAULT_CONFIG)
    else:
        raise ConfigError(
            DEFAULT_CONFIG, "(file)", "a plugins.toml here, --config PATH or --upstream URL", "none of them"
        )
    if upstreams:
        tables = [
            {
                "name": "upstream" if len(upstreams) == 1 else f"upstream-{i + 1}",
                "base_url": url,
                "api_key": args.api_key_env and f"${{{args.api_key_env}}}" or "",
            }
            for i, url in enumerate(upstreams)
        ]
        settings = StreamvisorConfig.from_dict({"plugins": {"openai": {"upstreams": tables}}}, source="--upstream")
        config = config.without_plugin("local").with_plugin("openai", settings.plugins[0].settings)
    server: dict[str, Any] = {}
    if getattr(args, "host", None):
        server["host"] = args.host
    if getattr(args, "port", None) is not None:
        server["port"] = args.port
    if server:
        config = attrs.evolve(config, server=attrs.evolve(config.server, **server))
    return config


# -- serve ---------------------------------------------------------------------

#: Net allocations of container objects between two young garbage collections in
#: `streamvisor serve` (CPython's default is 700).
YOUNG_GC_THRESHOLD = 10_000


@attrs.frozen
class Listening:
    url: str
    runtime: Any
    #: The quart app serving it (tests read its url_map).
    app: Any = None


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` and listening (port 0: a free one),
    with the options hypercorn sets on the sockets it binds itself."""
    from hypercorn.config import Config as HypercornConfig

    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(HypercornConfig.backlog)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    config: StreamvisorConfig,
    *,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
    shutdown: trio.Event | None = None,
    plugins: dict[str, Any] | None = None,
    listen_fd: int | None = None,
    worker: int | None = None,
) -> None:
    """Run the runtime and the HTTP server until `shutdown` is set (or cancelled).

    Binds `[server] host` and `port` before the runtime opens, so that with
    port 0 the runtime (and its plugins) see the real port in
    `config.server.port`. Reports where it listens, and the runtime, through
    `task_status`. A worker of `serve --workers` passes the listening socket it
    inherited (`listen_fd`, which it then owns) and its index (`worker`), which
    names it: `Runtime.instance` is host:port, plus "/wN" for worker N.
    """
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app
    from .runtime import Runtime

    if shutdown is None:
        shutdown = trio.Event()
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else listen_socket(config.server.host, config.server.port)
    with sock:
        port = sock.getsockname()[1]
        config = attrs.evolve(config, server=attrs.evolve(config.server, port=port))
        instance = f"{os.uname().nodename}:{port}" + ("" if worker is None else f"/w{worker}")
        async with Runtime.open(config, plugins=plugins, instance=instance) as runtime:
            app = create_app(runtime)
            hconfig = HypercornConfig()
            # hypercorn wraps an fd:// in a socket object of its own, which closes
            # it when it is garbage collected: it gets a duplicate, and `sock` (the
            # same listening socket) stays ours until it has finished serving.
            hconfig.bind = [f"fd://{os.dup(sock.fileno())}"]
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("hypercorn.error")
            hconfig.graceful_timeout = config.server.shutdown_grace_seconds
            hconfig.keep_alive_timeout = 75
            hypercorn_patch.apply()  # idle keep-alive connections are closed at shutdown
            async with trio.open_nursery() as nursery:
                async def stop_streams_first() -> None:
                    # hypercorn waits up to its graceful timeout for requests in
                    # flight: a stream would hold the whole grace period and then
                    # be cut with no end. Stopped first, every stream ends at once
                    # with its `stopped` chunk (state `shutdown`), its usage recorded.
                    await shutdown.wait()
                    for session in runtime.sessions.live():
                        session.cancel("shutdown")
                    # Idle keep-alive connections would hold the stop for the
                    # whole grace period: closed while hypercorn stops.
                    nursery.start_soon(close_idle_while_stopping)

                closer = trio.CancelScope()

                async def close_idle_while_stopping() -> None:
                    with closer:
                        await hypercorn_patch.close_idle_connections()

                async def run_hypercorn(task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await hypercorn_serve(app, hconfig, shutdown_trigger=stop_streams_first, task_status=task_status)
                    finally:
                        closer.cancel()

                binds = await nursery.start(run_hypercorn)
                url = binds[0].replace("0.0.0.0", "127.0.0.1")
                models = ", ".join(m.id for m in runtime.providers.models()) or "none"
                # Its own logger, always at INFO: whatever log_level says, an operator
                # (or a supervisor that passed --port 0) must learn the address. It
                # names the address bound, not the one to connect to: a server open
                # on every interface must not read as if it were on loopback only.
                # A worker's line must not read as the group's: its supervisor says
                # "listening on" once every worker serves.
                ready = logging.getLogger("streamvisor.ready")
                if worker is None:
                    ready.info("streamvisor listening on %s (models: %s)", binds[0], models)
                    # Pages for people (a route whose GET operation says
                    # "x-streamvisor-page": its label): the last lines, to open.
                    for label, path in _pages(runtime):
                        ready.info("%s: %s%s", label, url, path)
                else:
                    ready.info("streamvisor worker %d serving %s (pid %d, models: %s)", worker, binds[0], os.getpid(), models)
                task_status.started(Listening(url, runtime, app))


def _pages(runtime: Any) -> list[tuple[str, str]]:
    """(label, path) of the routes plugins marked as pages for people (contract
    1.5: `"x-streamvisor-page": "Console"` in a GET route's OpenAPI operation)."""
    pages = []
    for route in runtime.routes:
        label = route.openapi.get("GET", {}).get("x-streamvisor-page")
        if isinstance(label, str) and label and "<" not in route.path:
            pages.append((label, route.path))
    return pages


@attrs.frozen
class WorkerRole:
    """What a worker process of `serve --workers` got from its supervisor."""

    index: int
    listen_fd: int
    #: Its end of a socket pair with the supervisor (core/workers.py).
    supervisor_fd: int


async def _serve_until_signal(config: StreamvisorConfig, worker: WorkerRole | None = None) -> None:
    shutdown = trio.Event()
    serving = False
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    shutdown.set()
                    if not serving:
                        # Still starting (a model loading, a store connecting): stop that.
                        nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)

        async def run(task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(
                config,
                shutdown=shutdown,
                task_status=task_status,
                listen_fd=worker.listen_fd if worker else None,
                worker=worker.index if worker else None,
            )
            nursery.cancel_scope.cancel()

        listening: Listening = await nursery.start(run)
        serving = True
        if worker is not None:
            models = ", ".join(m.id for m in listening.runtime.providers.models()) or "none"
            nursery.start_soon(_report_to_supervisor, worker.supervisor_fd, models, shutdown)
        # What start-up made (modules, the app, the plugins, a loaded model) lives
        # as long as the process: moved out of the garbage collector's sight, it is
        # no longer walked by every full collection.
        gc.collect()
        gc.freeze()
        # A young collection every 700 net allocations (CPython's default) ran
        # about 150 times a second at 1,000 streams/s, most of it over objects that
        # reference counting frees a moment later: 10,000 cut the collector's time
        # from 4.4 % of the server to about 1 % (docs/architecture.md).
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


async def _report_to_supervisor(fd: int, models: str, shutdown: trio.Event) -> None:
    """A worker tells its supervisor that it serves, then holds the line: the
    end of the file means the supervisor is gone (even killed with -9), and a
    worker does not outlive it."""
    async with trio.lowlevel.FdStream(fd) as channel:
        try:
            await channel.send_all(f"ready {models}\n".encode())
            while await channel.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
    log.warning("the supervisor of this worker is gone: shutting down")
    shutdown.set()


def _positive_workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of worker processes, 1 or more; found {text!r}")
    return count


def _worker_command(args: argparse.Namespace) -> list[str]:
    """The command line of a worker: `serve` with this one's configuration."""
    command = [sys.executable, "-m", "streamvisor.core.cli", "serve"]
    if args.config:
        command += ["--config", args.config]
    for url in args.upstream or ():
        command += ["--upstream", url]
    if args.api_key_env:
        command += ["--api-key-env", args.api_key_env]
    return command


def cmd_serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    configure(config.server.log_level, config.server.log_format)
    if args.worker_index is not None:
        trio.run(_serve_until_signal, config, WorkerRole(args.worker_index, args.listen_fd, args.supervisor_fd))
        return 0
    if args.workers > 1:
        from .workers import WorkerGroup

        with listen_socket(config.server.host, config.server.port) as sock:
            return trio.run(WorkerGroup(config, args.workers, _worker_command(args), sock).run)
    trio.run(_serve_until_signal, config)
    return 0


# -- chat ----------------------------------------------------------------------


async def _chat_in_process(config: StreamvisorConfig, args: argparse.Namespace) -> int:
    from .chat import ChatRequest
    from .runtime import Runtime

    async with Runtime.open(config) as runtime:
        models = runtime.providers.models()
        if not models:
            print("error: no models are configured", file=sys.stderr)
            return 1
        body = _chat_body(args, args.model or models[0].id)
        session = runtime.open_session(ChatRequest.from_openai(body))
        async for batch in session.follow():
            for delta in batch:
                if delta.reasoning:
                    sys.stdout.write(f"\x1b[2m{delta.reasoning}\x1b[0m")
                if delta.content:
                    sys.stdout.write(delta.content)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if session.error is not None:
            print(f"error: {session.error.message}", file=sys.stderr)
            return 1
        usage = session.usage
        if usage is not None and args.usage:
            print(
                f"[{session.model}: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
                f"finish_reason={session.finish_reason}]",
                file=sys.stderr,
            )
        return 0


def _chat_body(args: argparse.Namespace, model: str) -> dict[str, Any]:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


async def _chat_remote(args: argparse.Namespace) -> int:
    import httpx
    import orjson

    base = args.url.rstrip("/")
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=600)) as client:
        model = args.model
        if not model:
            models = (await client.get(f"{base}/models")).json()["data"]
            if not models:
                print("error: the server lists no models", file=sys.stderr)
                return 1
            model = models[0]["id"]
        async with client.stream("POST", f"{base}/chat/completions", json=_chat_body(args, model)) as response:
            if response.status_code >= 400:
                await response.aread()
                print(f"error: {response.json()['error']['message']}", file=sys.stderr)
                return 1
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", ()):
                    text = choice["delta"].get("content")
                    if text:
                        sys.stdout.write(text)
                        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        return trio.run(_chat_remote, args)
    config = build_config(args)
    configure("warning" if not args.verbose else config.server.log_level)
    return trio.run(_chat_in_process, config, args)


# -- plugins -------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from streamvisor.hooks.manager import PluginHost
    from streamvisor.hooks.markers import CONTRACT_VERSION

    config = build_config(args)
    host = PluginHost.from_config(config)
    disabled = [p.name for p in config.plugins if not p.enabled]
    header = ("name", "version", "from", "contract", "hooks")
    rows = [(p.name, p.version, p.origin, p.contract or "-", ", ".join(p.hooks)) for p in host]
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row[:4])) + "  " + row[4])
    if disabled:
        print(f"disabled in {config.source}: {', '.join(disabled)}")
    print(f"this streamvisor implements plugin contract {CONTRACT_VERSION}")
    return 0


# -- db ----------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    """Run the store's migrations by hand (`upgrade`) or show where they stand
    (`status`). The plugin whose object has `db_command` is the store."""
    from streamvisor.hooks.manager import PluginHost

    config = build_config(args)
    host = PluginHost.from_config(config)
    stores = [p for p in host if callable(getattr(p.plugin, "db_command", None))]
    if not stores:
        print(f"streamvisor: {config.source} enables no store plugin (add a [plugins.store] table)", file=sys.stderr)
        return 2
    loaded = stores[0]
    try:
        status = loaded.plugin.db_command(args.action, config.source)
    except Exception as exc:
        print(f"streamvisor: the store of plugin {loaded.name!r} cannot be opened: {exc}", file=sys.stderr)
        return 1
    print(f"store: {status['url']}")
    for version in status.get("applied_now", []):
        print(f"applied migration {version}")
    print(f"schema version: {status['current']} (latest {status['latest']})")
    for pending in status["pending"]:
        print(f"pending: {pending['version']} {pending['description']}")
    if not status["pending"]:
        print("up to date")
    return 0


# -- keys --------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    """`streamvisor keys ...`: the keys plugin's own command, run against the
    store outside any server. The plugin whose object has `keys_command` is the
    keys plugin; the one with `offline_store` opens the store."""
    from streamvisor.hooks.manager import PluginHost

    config = build_config(args)
    host = PluginHost.from_config(config)
    keys = [p for p in host if callable(getattr(p.plugin, "keys_command", None))]
    stores = [p for p in host if callable(getattr(p.plugin, "offline_store", None))]
    if not keys:
        print(f"streamvisor: {config.source} does not enable the keys plugin (add a [plugins.keys] table)", file=sys.stderr)
        return 2
    if not stores:
        print(f"streamvisor: {config.source} enables no store plugin, where keys are kept (add a [plugins.store] table)", file=sys.stderr)
        return 2

    async def run() -> int:
        try:
            opened = stores[0].plugin.offline_store(config.source)
            store = await opened.__aenter__()
        except Exception as exc:
            print(f"streamvisor: the store of plugin {stores[0].name!r} cannot be opened: {exc}", file=sys.stderr)
            return 1
        try:
            return await keys[0].plugin.keys_command(args.argv, store, config=config)
        finally:
            await opened.__aexit__(None, None, None)

    return trio.run(run)


# -- new-plugin ------------------------------------------------------------------


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import ScaffoldError, new_plugin

    try:
        folder = new_plugin(args.name, Path(args.dir))
    except ScaffoldError as exc:
        print(f"streamvisor: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}/: pyproject.toml, {', '.join(sorted(p.name for p in folder.glob('*.py')))}, README.md, tests/")
    print("next:")
    print(f"  cd {folder}")
    print("  pip install -e '.[test]'    # where streamvisor is installed")
    print("  pytest")
    print(f"then enable it with a [plugins.{args.name}] table in plugins.toml")
    return 0


# -- entry point -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="streamvisor", description="An OpenAI-compatible AI streaming backend.")
    commands = top.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help=f"the plugins.toml to use (default: ./{DEFAULT_CONFIG})")
        p.add_argument("--upstream", action="append", metavar="URL", help="serve the models of an OpenAI-compatible server (repeatable; no config file needed)")
        p.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the upstream's API key")

    serve_p = commands.add_parser("serve", help="serve the API")
    with_config(serve_p)
    serve_p.add_argument("--host", help="address to listen on (default from [server], 127.0.0.1)")
    serve_p.add_argument("--port", type=int, help="port to listen on (default from [server], 8000; 0 picks a free one)")
    serve_p.add_argument(
        "--workers", type=_positive_workers, default=1, metavar="N",
        help="serve with N worker processes on one port under one supervisor (default 1: this process serves)",
    )
    # A worker of `--workers`: its index, the listening socket and its line to
    # the supervisor, inherited file descriptors (core/workers.py).
    for hidden in ("--worker-index", "--listen-fd", "--supervisor-fd"):
        serve_p.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    serve_p.set_defaults(run=cmd_serve)

    chat_p = commands.add_parser("chat", help="stream one completion to the terminal")
    with_config(chat_p)
    chat_p.add_argument("prompt")
    chat_p.add_argument("--model", "-m", help="model name (default: the first one listed)")
    chat_p.add_argument("--system", "-s", help="a system message")
    chat_p.add_argument("--max-tokens", type=int)
    chat_p.add_argument("--temperature", type=float)
    chat_p.add_argument("--url", help="talk to a running server at this /v1 base URL instead of running in-process")
    chat_p.add_argument("--usage", action="store_true", help="print token usage after the reply")
    chat_p.add_argument("--verbose", "-v", action="store_true", help="show the server's log lines")
    chat_p.set_defaults(run=cmd_chat)

    plugins_p = commands.add_parser("plugins", help="list the plugins plugins.toml loads")
    with_config(plugins_p)
    plugins_p.set_defaults(run=cmd_plugins)

    db_p = commands.add_parser("db", help="the store's schema: status, or upgrade it")
    with_config(db_p)
    db_p.add_argument("action", choices=("status", "upgrade"), help="status: show the schema version and pending migrations; upgrade: run them")
    db_p.set_defaults(run=cmd_db)

    keys_p = commands.add_parser(
        "keys",
        help="API keys in the store: create, list, show, revoke, rotate",
        description="Manage API keys in the store (the keys plugin); `streamvisor keys create --help` for a command's options.",
    )
    with_config(keys_p)
    keys_p.add_argument("argv", nargs=argparse.REMAINDER, metavar="create|list|show|revoke|rotate ...")
    keys_p.set_defaults(run=cmd_keys)

    new_p = commands.add_parser("new-plugin", help="write a ready third-party plugin package to start from")
    new_p.add_argument("name", help="the plugin's name in plugins.toml (lower case; the package is streamvisor-NAME)")
    new_p.add_argument("--dir", default=".", help="where to write the package folder (default: here)")
    new_p.set_defaults(run=cmd_new_plugin)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        # Start-up errors surface from inside nurseries, wrapped in groups.
        inner = unwrap(exc)
        if isinstance(inner, ConfigError):
            print(f"streamvisor: configuration error: {inner}", file=sys.stderr)
            return 2
        if isinstance(inner, PluginError):
            print(f"streamvisor: cannot start: {inner}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
