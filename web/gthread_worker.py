"""gunicorn's gthread worker, with a time limit on a connection that has not sent a whole request yet.

gunicorn 23's gthread worker times out a connection only between two requests: a new connection that sends
nothing keeps its place (toward `worker_connections`) for ever, and one that sends part of its headers keeps a
thread for ever. Here both are closed after `keepalive` seconds, as the gevent worker does; once a request's
headers are in, its body, its answer and a WebSocket take as long as they need.
"""
from __future__ import annotations

import errno
import selectors
from functools import partial

from gunicorn.workers import gthread


class TimedConn(gthread.TConn):
    def init(self) -> None:
        super().init()
        self.sock.settimeout(self.cfg.keepalive or None)  # for reading the request's headers only: see below


class ThreadWorker(gthread.ThreadWorker):
    def accept(self, server, listener) -> None:
        """As gunicorn's, but the new connection waits for its first bytes on the keep-alive clock."""
        try:
            sock, client = listener.accept()
        except OSError as exc:  # ignored as gunicorn's own does: another worker took it, or the client gave up
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TimedConn(self.cfg, sock, client, server)
        self.nr_conns += 1
        with self._lock:
            if self.cfg.keepalive:
                conn.set_timeout()
                self._keep.append(conn)  # murder_keepalived closes it when it is still silent at its timeout
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn, client) -> None:
        if not conn.initialized:  # a new connection leaves the keep-alive clock as its first request starts
            with self._lock:
                try:
                    self._keep.remove(conn)
                except ValueError:
                    pass
        super().on_client_socket_readable(conn, client)

    def handle_request(self, req, conn):
        conn.sock.settimeout(None)  # the headers are in: the body, the answer or a WebSocket are not idle time
        return super().handle_request(req, conn)
