"""Following a session's events as they happen: one turn until it ends, or the whole session.

Both generators read through the process's event hub (web/hub.py: one Redis reader for every
follower). They yield None on each quiet second, so a caller can send a heartbeat or check its
client; they hold no request context, so a streaming response can run them. They ride out a
Redis restart (reading on from their cursor, so nothing is missed or repeated) and give up with
StreamInterrupted when Redis stays away, or SlowClient when the client fell more than
CCD_STREAM_BUFFER_EVENTS behind; either way the client resumes with its last id.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable, Iterator

import redis
from sqlalchemy.exc import SQLAlchemyError

from flask import current_app, has_app_context

from core.envelope import Event
from core.events import EventLog, id_before
from core.settings import Settings
from web.hub import REDIS_DOWN, RETRY_PAUSE_SECONDS, Feed, SlowClient, follow, frame_json
from web.metrics import STREAM_DROPPED, LagMeter

FINAL_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
BLOCK_SECONDS = 1.0  # a quiet follower yields None this often (heartbeats, client checks)
CHECK_EVERY_SECONDS = 5.0
# How long a stream waits for Redis to come back before it ends; a restart with AOF takes seconds.
REDIS_RETRY_SECONDS = 30.0


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


def buffer_size() -> int:
    """This app's CCD_STREAM_BUFFER_EVENTS (its default outside an app)."""
    if has_app_context():
        return current_app.extensions["ccd"].settings.stream_buffer_events
    return Settings.stream_buffer_events


def turn_events(events: EventLog, session_id: str, turn_id: str, start_id: str,
                still_running: Callable[[], bool], deadline: float | None = None,
                rejoin: bool = False) -> Iterator[Event | None]:
    """The turn's events from `start_id` (its turn.queued, included) through its final event.

    Ends early at `deadline` (monotonic), or when the turn is over but its final event is
    gone from the stream (trimmed or deleted), which `still_running` tells. A reader that
    falls too far behind gets SlowClient, or with `rejoin` catches up from Redis instead.
    """
    feed = follow(events, session_id, id_before(start_id), buffer_size(), rejoin)
    return _turn_events(feed, turn_id, still_running, deadline)


def _turn_events(feed: Feed, turn_id: str, still_running: Callable[[], bool],
                 deadline: float | None) -> Iterator[Event | None]:
    checked, outage = time.monotonic(), Outage()
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = BLOCK_SECONDS if deadline is None else max(0.001, min(BLOCK_SECONDS, deadline - time.monotonic()))
            batch = outage.read(feed.cursor, partial(feed.next, wait))
            if batch is DOWN:
                yield None
                continue
            for event in batch:
                if event.turn_id == turn_id:
                    yield event
                    if event.type in FINAL_TYPES:
                        return
            if not batch:
                yield None
                if time.monotonic() - checked > CHECK_EVERY_SECONDS:
                    checked = time.monotonic()
                    try:
                        if not still_true(still_running) and not feed.hub.events.read(feed.session_id, feed.cursor,
                                                                                       count=1):
                            return
                    except REDIS_DOWN:
                        pass  # the next read rides out the outage
    finally:
        feed.close()


def tail(events: EventLog, session_id: str, since: str | None,
         session_exists: Callable[[], bool]) -> Iterator[Event | None]:
    """Every event after `since` (a stream.gap first when some were trimmed), then live ones,
    until the session is deleted; SlowClient when the reader falls too far behind."""
    return _one_by_one(tail_batches(events, session_id, since, session_exists))


def _one_by_one(batches: Iterator[list[Event]]) -> Iterator[Event | None]:
    try:
        for batch in batches:
            yield from batch or [None]
    finally:
        batches.close()


def tail_batches(events: EventLog, session_id: str, since: str | None,
                 session_exists: Callable[[], bool]) -> Iterator[list[Event]]:
    """tail(), a batch at a time ([] on a quiet second), so a writer can send several in one write."""
    return _tail(follow(events, session_id, since or "0-0", buffer_size()), session_exists)


def _tail(feed: Feed, session_exists: Callable[[], bool]) -> Iterator[list[Event]]:
    trimmed, outage, checked = DOWN, Outage(), time.monotonic()  # trimmed: DOWN until the gap is checked
    try:
        while True:
            if trimmed is DOWN:
                trimmed = outage.read(feed.cursor, feed.gap_after)
                if trimmed is DOWN:
                    yield []
                    continue
                if trimmed:
                    yield [gap_event(feed.session_id, feed.cursor, trimmed)]
            batch = outage.read(feed.cursor, partial(feed.next, BLOCK_SECONDS))
            yield [] if batch is DOWN else batch
            if time.monotonic() - checked > CHECK_EVERY_SECONDS:
                checked = time.monotonic()
                if not still_true(session_exists):
                    return
    finally:
        feed.close()


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
    except SlowClient as exc:  # a comment says why; EventSource reconnects with Last-Event-ID
        STREAM_DROPPED.labels("sse").inc()
        yield f": {exc}\n\n"


def sse_frame(event: Event) -> str:
    """One Server-Sent Event: the stream id (for Last-Event-ID), the type, the envelope; built once per event."""
    text = event.__dict__.get("_sse")
    if text is None:
        head = f"id: {event.id}\n" if event.id else ""
        text = event.__dict__["_sse"] = f"{head}event: {event.type}\ndata: {frame_json(event)}\n\n"
    return text


SSE_HEARTBEAT = ": keep-alive\n\n"
