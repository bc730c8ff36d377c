"""Following a session's events over SSE: parsing, reconnecting with Last-Event-ID, deduplicating."""
from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import requests

from client.errors import ConnectionFailed, NotFound, Unavailable

if TYPE_CHECKING:
    from client.api import Client

Event = dict[str, Any]
MAX_RECONNECTS = 8  # consecutive failed attempts before a follower gives up
READ_ERRORS = (requests.RequestException, OSError, ValueError)


def stream_id_key(event_id: str) -> tuple[int, int]:
    """A Redis stream id ("1732450000000-0") as a sortable pair."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def id_before(event_id: str) -> str:
    """The greatest stream id before `event_id`."""
    ms, seq = stream_id_key(event_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Complete text lines from a byte stream, as they arrive (a partial last line is dropped)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")


def sse_events(lines: Iterator[str]) -> Iterator[Event | None]:
    """Parsed SSE frames: each `data:` envelope as a dict, None for a heartbeat or other frame."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
            else:
                yield None
    # A frame cut off by a dropped connection is discarded: it is read again after reconnecting.


def break_connection(resp: requests.Response | None) -> None:
    """Shuts the response's socket down, as a network failure would; its reader sees the stream
    break (closing the response instead would fail the reader with an AttributeError)."""
    if resp is None:
        return
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if sock is None:
        resp.close()
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


def backoff(attempt: int) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 = at once)."""
    return 0.0 if attempt == 0 else min(5.0, 0.25 * 2 ** attempt)


class EventFollower:
    """An iterator over a session's events, live over SSE, that survives dropped connections.

    Each reconnect sends Last-Event-ID (the last id seen), and ids at or before it are skipped,
    so nothing is lost or repeated. It ends when the session is deleted; `drop()` breaks the
    current connection (as a network failure would), `close()` ends the iteration.
    """

    def __init__(self, client: Client, session_id: str, since: str | None = None) -> None:
        self.client, self.session_id, self.last_id = client, session_id, since
        self.response: requests.Response | None = None
        self.connects = 0
        self.on_connect: Callable[["EventFollower"], None] | None = None
        self._closed = False
        self._events = self._follow()

    def __iter__(self) -> "EventFollower":
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def __enter__(self) -> "EventFollower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop(self) -> None:
        """Breaks the current connection; the iteration reconnects and carries on."""
        break_connection(self.response)

    def close(self) -> None:
        """Ends the iteration and its connection."""
        self._closed = True
        break_connection(self.response)
        try:
            self._events.close()
        except ValueError:
            pass  # closed from another thread while it reads: it stops at its next check

    def _follow(self) -> Iterator[Event]:
        failures = 0
        while not self._closed:
            try:
                resp = self._connect()
            except (ConnectionFailed, Unavailable):
                if failures >= MAX_RECONNECTS:
                    raise
                time.sleep(backoff(failures + 1))
                failures += 1
                continue
            for event in self._read(resp):
                failures = 0
                yield event
            if self._closed or self._session_gone():
                return
            failures += 1
            time.sleep(backoff(failures - 1))

    def _connect(self) -> requests.Response:
        """Opens the SSE stream after the last id seen."""
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        self.response = self.client.request("GET", f"/sessions/{self.session_id}/events", stream=True,
                                            headers=headers)
        self.connects += 1
        if self.on_connect is not None:
            self.on_connect(self)
        return self.response

    def _read(self, resp: requests.Response) -> Iterator[Event]:
        """The new events of one connection, until it ends or breaks."""
        try:
            for event in sse_events(split_lines(resp.iter_content(chunk_size=None))):
                if event is not None and self._is_new(event):
                    yield event
        except READ_ERRORS:
            pass
        finally:
            resp.close()

    def _is_new(self, event: Event) -> bool:
        """Records the event's id; False for an event at or before the last one seen."""
        event_id = event.get("id")
        if not event_id:
            return True  # stream.gap carries no id
        if self.last_id and stream_id_key(event_id) <= stream_id_key(self.last_id):
            return False
        self.last_id = event_id
        return True

    def _session_gone(self) -> bool:
        """True when the stream ended because the session was deleted."""
        try:
            return self.client.session(self.session_id)["status"] == "deleted"
        except NotFound:
            return True
        except (ConnectionFailed, Unavailable):
            return False
