"""Following a session's events as they happen: one turn until it ends, or the whole session.

Both generators yield None on each quiet second, so a caller can send a heartbeat or check
its client; they hold no request context, so a streaming response can run them.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from core.envelope import Event
from core.events import EventLog, id_before

FINAL_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
BLOCK_MS = 1000
CHECK_EVERY_SECONDS = 5.0


def gap_event(session_id: str, since: str, trimmed_through: str) -> Event:
    return Event(session_id=session_id, type="stream.gap",
                 data={"since": since, "missing_through": trimmed_through,
                       "message": "events after `since` were trimmed; fetch turn results instead"})


def turn_events(events: EventLog, session_id: str, turn_id: str, start_id: str,
                still_running: Callable[[], bool], deadline: float | None = None) -> Iterator[Event | None]:
    """The turn's events from `start_id` (its turn.queued, included) through its final event.

    Ends early at `deadline` (monotonic), or when the turn is over but its final event is
    gone from the stream (trimmed or deleted), which `still_running` tells.
    """
    cursor, checked = id_before(start_id), time.monotonic()
    while deadline is None or time.monotonic() < deadline:
        block = BLOCK_MS if deadline is None else max(1, min(BLOCK_MS, int((deadline - time.monotonic()) * 1000)))
        batch = events.wait(session_id, cursor, block)
        for event in batch:
            cursor = event.id
            if event.turn_id == turn_id:
                yield event
                if event.type in FINAL_TYPES:
                    return
        if not batch:
            yield None
            if time.monotonic() - checked > CHECK_EVERY_SECONDS:
                checked = time.monotonic()
                if not still_running() and not events.read(session_id, cursor, count=1):
                    return


def tail(events: EventLog, session_id: str, since: str | None,
         session_exists: Callable[[], bool]) -> Iterator[Event | None]:
    """Every event after `since` (a stream.gap first when some were trimmed), then live ones,
    until the session is deleted."""
    cursor = since or "0-0"
    trimmed = events.gap_after(session_id, cursor)
    if trimmed:
        yield gap_event(session_id, cursor, trimmed)
    checked = time.monotonic()
    while True:
        batch = events.wait(session_id, cursor, BLOCK_MS)
        for event in batch:
            cursor = event.id
            yield event
        if not batch:
            yield None
        if time.monotonic() - checked > CHECK_EVERY_SECONDS:
            checked = time.monotonic()
            if not session_exists():
                return


def sse_frame(event: Event) -> str:
    """One Server-Sent Event: the stream id (for Last-Event-ID), the type, the envelope."""
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.type}\ndata: {event.to_json()}\n\n"


SSE_HEARTBEAT = ": keep-alive\n\n"
