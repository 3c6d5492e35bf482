"""Hello-world baselines: what the server stack costs before streamvisor adds anything.

Owns: two trivial servers on hypercorn's trio worker, configured as
`streamvisor serve` configures hypercorn, that answer `POST /v1/chat/completions`
by streaming the fake upstream's recorded SSE events (50 content chunks, usage,
`[DONE]`), one body write per event:

- `quart` (default): a quart-trio route, as streamvisor's own routes are;
- `quart_batched`: the same route sending all 52 events in one body write, as
  streamvisor does when every chunk is ready at once;
- `asgi`: a bare ASGI callable, without quart, to separate quart's cost from
  hypercorn's;
- `relay`: the least a gateway on this stack does: a quart-trio route that
  forwards the body of the upstream's answer (`--upstream-port`), read with
  streamvisor's own HTTP client, with no session, no parsing and no plugins. The
  memory scenario runs it beside streamvisor as the floor of memory per open
  stream.

Run: `python -m bench.hello --port 0 [--kind asgi]`; it prints `ready PORT`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from .system import raise_fd_limit
from .upstream import sse_events

EVENTS = sse_events()
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","created":0,"owned_by":"hello"}]}'


def quart_app(batched: bool = False) -> Any:
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("bench.hello")

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(MODELS, content_type="application/json")

    @app.post("/v1/chat/completions")
    async def completions() -> Response:
        await request.get_data()

        async def body():
            if batched:
                yield b"".join(EVENTS)
                return
            for event in EVENTS:
                yield event

        response = Response(body(), content_type="text/event-stream")
        response.timeout = None
        return response

    return app


def relay_app(upstream_port: int) -> Any:
    from quart import Response, request
    from quart_trio import QuartTrio

    from streamvisor.core.httpclient import HTTPClient

    app = QuartTrio("bench.hello.relay")
    client = HTTPClient(
        f"http://127.0.0.1:{upstream_port}/v1", max_connections=100_000, max_idle=256, read_timeout=600, pool_timeout=600
    )
    headers = (("Content-Type", "application/json"),)

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(MODELS, content_type="application/json")

    @app.post("/v1/chat/completions")
    async def completions() -> Response:
        body = await request.get_data()

        async def relay():
            async with client.stream("POST", "chat/completions", body=body, headers=headers) as upstream:
                while data := await upstream.receive():
                    yield data

        response = Response(relay(), content_type="text/event-stream")
        response.timeout = None
        return response

    return app


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if scope["path"] == "/v1/models":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": MODELS})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in EVENTS:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def serve(kind: str, port: int, upstream_port: int = 0) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    if kind == "relay":
        app = relay_app(upstream_port)
    else:
        app = asgi_app if kind == "asgi" else quart_app(batched=kind == "quart_batched")
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 1
    shutdown = trio.Event()

    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(watch_signals)
        binds = await nursery.start(lambda task_status: hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status))
        print(f"ready {binds[0].rsplit(':', 1)[1]}", flush=True)
        await shutdown.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--kind", choices=["quart", "quart_batched", "asgi", "relay"], default="quart")
    p.add_argument("--upstream-port", type=int, default=0, help="the upstream of --kind relay")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    raise_fd_limit()
    if args.kind == "relay" and not args.upstream_port:
        p.error("--kind relay needs --upstream-port")
    trio.run(serve, args.kind, args.port, args.upstream_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
