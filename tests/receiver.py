"""A webhook receiver for the tests: an HTTP server on a loopback address that answers each POST as told (a status,
a Location, held open until released) and records the status, headers and body of every request."""
from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class Receiver:
    def __init__(self, status: int | Callable[[int], int] = 200, location: str | None = None, hold: bool = False,
                 address: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        """`status`: the answer, or a function of how many requests came before; `hold`: each request waits
        for `release` to be set before it is answered."""
        self.calls: list[tuple[int, object, bytes]] = []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = status(len(receiver.calls)) if callable(status) else status
                receiver.calls.append((answer, self.headers, body))
                receiver.release.wait(30)
                self.send_response(answer)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # a client that follows a 302 with a GET is seen too

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://{address}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def header(self, name: str) -> list[str]:
        """That header of every request so far."""
        return [headers[name] for _, headers, _ in self.calls]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
