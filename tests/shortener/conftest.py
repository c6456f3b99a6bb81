"""Fixtures shared by the shortener's tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@pytest.fixture
def token_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A real HTTP server answering /<domain>/.well-known/... with the token it is given for
    that domain (404 without one); yields a verification URL template and the tokens."""
    tokens: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            token = tokens.get(self.path.strip("/").split("/")[0])
            body = (token or "").encode()
            self.send_response(200 if token else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        yield base + "/{domain}/.well-known/tenfold-domain-verification", tokens
    finally:
        server.shutdown()
        server.server_close()
