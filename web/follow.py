"""Following a session's events as they happen: one turn until it ends, or the whole session.

Both generators yield None on each quiet second, so a caller can send a heartbeat or check
its client; they hold no request context, so a streaming response can run them. They ride out
a Redis restart (reading on from their cursor, so nothing is missed or repeated) and give up
with StreamInterrupted when Redis stays away, so the client can resume with its last id.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable, Iterator

import redis
from sqlalchemy.exc import SQLAlchemyError

from core.envelope import Event
from core.events import EventLog, id_before
from web.metrics import LagMeter

FINAL_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
BLOCK_MS = 1000
CHECK_EVERY_SECONDS = 5.0
# How long a stream waits for Redis to come back before it ends; a restart with AOF takes seconds.
REDIS_RETRY_SECONDS = 30.0
RETRY_PAUSE_SECONDS = 0.5
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class StreamInterrupted(redis.ConnectionError):
    """Redis stayed away: the stream ends; `last_id` is where the client should resume (since=)."""

    def __init__(self, last_id: str) -> None:
        super().__init__(f"the event store is not answering; resume with since={last_id}")
        self.last_id = last_id


DOWN = object()  # what Outage.read gives while Redis is away


class Outage:
    """Tracks one stretch of Redis being unreachable, and bounds it."""

    def __init__(self) -> None:
        self.since: float | None = None

    def read(self, cursor: str, fetch: Callable[[], object]) -> object:
        """`fetch()`, or DOWN after a pause while Redis is away; StreamInterrupted once that lasts too long."""
        try:
            value = fetch()
        except REDIS_DOWN as exc:
            self.pause(cursor, exc)
            return DOWN
        self.since = None
        return value

    def pause(self, cursor: str, exc: Exception) -> None:
        """Waits before the next try; raises StreamInterrupted once the outage is too long."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > REDIS_RETRY_SECONDS:
            raise StreamInterrupted(cursor) from exc
        time.sleep(RETRY_PAUSE_SECONDS)


def still_true(check: Callable[[], bool]) -> bool:
    """`check()`, but True when the database cannot tell right now: a Postgres blip ends no stream."""
    try:
        return check()
    except SQLAlchemyError:
        return True


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
    cursor, checked, outage = id_before(start_id), time.monotonic(), Outage()
    while deadline is None or time.monotonic() < deadline:
        block = BLOCK_MS if deadline is None else max(1, min(BLOCK_MS, int((deadline - time.monotonic()) * 1000)))
        batch = outage.read(cursor, partial(events.wait, session_id, cursor, block))
        if batch is DOWN:
            yield None
            continue
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
                try:
                    if not still_true(still_running) and not events.read(session_id, cursor, count=1):
                        return
                except REDIS_DOWN:
                    pass  # the next wait rides out the outage


def tail(events: EventLog, session_id: str, since: str | None,
         session_exists: Callable[[], bool]) -> Iterator[Event | None]:
    """Every event after `since` (a stream.gap first when some were trimmed), then live ones,
    until the session is deleted."""
    cursor, trimmed, outage = since or "0-0", DOWN, Outage()  # trimmed: DOWN until the gap is checked
    checked = time.monotonic()
    while True:
        if trimmed is DOWN:
            trimmed = outage.read(cursor, partial(events.gap_after, session_id, cursor))
        batch = DOWN if trimmed is DOWN else outage.read(cursor, partial(events.wait, session_id, cursor, BLOCK_MS))
        if batch is DOWN:
            yield None
            continue
        if trimmed:
            yield gap_event(session_id, cursor, trimmed)
            trimmed = None
        for event in batch:
            cursor = event.id
            yield event
        if not batch:
            yield None
        if time.monotonic() - checked > CHECK_EVERY_SECONDS:
            checked = time.monotonic()
            if not still_true(session_exists):
                return


def sse_stream(events: Iterator[Event | None]) -> Iterator[str]:
    """An SSE body: the reconnect delay, then frames and heartbeats; ends cleanly when Redis stays
    away, and the browser's EventSource reconnects with Last-Event-ID."""
    yield "retry: 2000\n\n"
    lag = LagMeter("sse")
    try:
        for event in events:
            yield SSE_HEARTBEAT if event is None else sse_frame(event)
            if event is not None:
                lag.delivered(event)
    except REDIS_DOWN:  # StreamInterrupted, or a tail without its own retries
        return


def sse_frame(event: Event) -> str:
    """One Server-Sent Event: the stream id (for Last-Event-ID), the type, the envelope."""
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.type}\ndata: {event.to_json()}\n\n"


SSE_HEARTBEAT = ": keep-alive\n\n"
