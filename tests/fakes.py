"""A scripted OpenAI-compatible upstream on a stdlib HTTP server, for failure
modes a real model server will not produce on demand (429 with Retry-After,
5xx, silence, garbage)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeUpstream:
    """Answers each POST /chat/completions with the next response queued with
    `then()`, else with the default one (`respond()`); GET /models lists `m1`.
    Counts the POSTs and remembers their Authorization headers."""

    def __init__(self, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self.default = (status, headers or {}, body)
        self.delay = 0.0
        self.posts = 0
        self.seen_auth: list[str | None] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {}, json.dumps({"object": "list", "data": [{"id": "m1", "object": "model"}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.posts += 1
                    outer.seen_auth.append(self.headers.get("Authorization"))
                    status, headers, body = outer.script.pop(0) if outer.script else outer.default
                    delay = outer.delay
                if delay:
                    time.sleep(delay)
                self._send(status, headers, body)

            def _send(self, status, headers, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def respond(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Set the default response."""
        with self.lock:
            self.default = (status, headers or {}, body)

    def then(self, status: int, body: bytes = b"", **headers: str) -> None:
        """Queue one response; `Retry_After="1"` becomes the header Retry-After."""
        with self.lock:
            self.script.append((status, {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}, body))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released): connections to
    it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
