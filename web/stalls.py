"""Cuts off SSE and NDJSON followers that take no data for CCD_STREAM_SEND_TIMEOUT_SECONDS, as a WebSocket is.

gunicorn writes those response bodies itself, so a write to a client that stopped reading blocks with no time
limit, holding the connection (and, under gthread, a thread) until the client reads again. One watcher per web
process looks at every such stream each second and shuts down the socket of one whose write has been pending too
long: the blocked write then fails at once with a broken pipe, which gunicorn takes quietly, and the body's
generator is closed, which ends the follow.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Iterator

from web.metrics import STREAM_DROPPED

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 1.0


class Write:
    """One stream's pending write: since when (None while none is pending)."""

    __slots__ = ("sock", "transport", "since")

    def __init__(self, sock, transport: str) -> None:
        self.sock, self.transport, self.since = sock, transport, None


class StallWatch:
    """Every watched stream of this process; a daemon thread (a greenlet under gevent) checks them."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.lock, self.writes = seconds, threading.Lock(), set()
        self.pid = os.getpid()
        threading.Thread(target=self._run, name="stall-watch", daemon=True).start()

    def bounded(self, frames: Iterator[str], sock, transport: str) -> Iterator[str]:
        """`frames` as a response body that ends when the client takes none of one for `seconds`."""
        write = Write(sock, transport)
        with self.lock:
            self.writes.add(write)
        try:
            for frame in frames:
                write.since = time.monotonic()  # gunicorn writes it before it asks for the next
                yield frame
                write.since = None
        finally:
            with self.lock:
                self.writes.discard(write)
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    def _run(self) -> None:
        while True:
            time.sleep(CHECK_EVERY_SECONDS)
            now = time.monotonic()
            with self.lock:
                stalled = [w for w in self.writes if w.since is not None and now - w.since > self.seconds]
                for write in stalled:
                    self.writes.discard(write)
            for write in stalled:
                self._cut_off(write)

    def _cut_off(self, write: Write) -> None:
        STREAM_DROPPED.labels(write.transport).inc()
        log.info("%s follower took no data for %.0f s; disconnected", write.transport, self.seconds)
        # Under gevent, the OS socket's own shutdown: gevent's would end the blocked write with EBADF, which gunicorn
        # logs as an error with a traceback; a broken pipe it takes quietly.
        raw = getattr(write.sock, "_sock", write.sock)
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # it went away meanwhile


_WATCH: StallWatch | None = None
_WATCH_LOCK = threading.Lock()


def bounded(frames: Iterator[str], environ: dict, seconds: float, transport: str) -> Iterator[str]:
    """`frames`, cut off after `seconds` without progress when served by gunicorn (which hands over its socket);
    as they are otherwise (the test client, another server)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return frames
    global _WATCH
    with _WATCH_LOCK:
        if _WATCH is None or _WATCH.pid != os.getpid():  # first use, or a forked child
            _WATCH = StallWatch(seconds)
        watch = _WATCH
    return watch.bounded(frames, sock, transport)
