"""Session events over HTTP: a page of past events as JSON, or a live SSE stream."""
from __future__ import annotations

import time
import uuid
from typing import Callable

from flask import Response, g, request

from core import sessions as session_cmds
from core import tree_events as tree_cursor
from core import trees
from core.db import transaction
from core.envelope import Event
from core.errors import ValidationFailed
from core.events import is_stream_id
from core.models import Session
from web.api import api, query
from web.context import ctx, unit_of_work
from web import stalls
from web.follow import gap_event, sse_stream, tail
from web.hub import frame_json
from web.schemas import EventsQuery


# A page is read in chunks: the first this size, the next ones sized to what is left of the byte budget.
FIRST_CHUNK_EVENTS = 16
MAX_CHUNK_EVENTS = 200
# Followers of one session share its answer for this long: one query, not one per follower.
ALIVE_FOR_SECONDS = 1.0
_alive: dict[tuple[int, str], tuple[float, bool]] = {}


def session_alive(session_id: str):
    """A check that runs outside the request (inside a streaming response)."""
    db_factory = ctx().db
    key = (id(db_factory), session_id)

    def alive() -> bool:
        now = time.monotonic()
        known = _alive.get(key)
        if known is not None and now - known[0] < ALIVE_FOR_SECONDS:
            return known[1]
        if len(_alive) > 10_000:
            _alive.clear()  # a bound, not an eviction policy: entries are a second's worth of saved queries
        # Followers that ask while this query runs take the last answer: one query at a time per session.
        _alive[key] = (now, True if known is None else known[1])
        with transaction(db_factory) as db:
            row = db.get(Session, uuid.UUID(session_id))
            answer = row is not None and row.status != "deleted"
        _alive[key] = (time.monotonic(), answer)
        return answer
    return alive


def tree_members(session_id: str):
    """A function that lists the session and its live descendants (None once the session is deleted)."""
    db_factory = ctx().db

    def members() -> list[str] | None:
        with transaction(db_factory) as db:
            row = db.get(Session, uuid.UUID(session_id))
            if row is None or row.status == "deleted":
                return None
            return [session_id] + [str(s.id) for s in trees.descendants(db, row.id) if s.status != "deleted"]
    return members


@api.get("/sessions/<session_id>/events")
def events(session_id: str):
    """Past events after `since`, `limit` at a time; with Accept: text/event-stream, live SSE
    that resumes after the Last-Event-ID header (or `since`). ?tree=true merges in the events
    of every session below this one."""
    q = query(EventsQuery)
    live = request.accept_mimetypes.best_match(["application/json", "text/event-stream"]) == "text/event-stream"
    since = (request.headers.get("Last-Event-ID") if live else None) or q.since
    if q.tree:
        return tree_events(session_id, since, live, q.limit)
    if since and not is_stream_id(since):
        raise ValidationFailed("since (or Last-Event-ID) must be an event id like 1732450000000-0",
                               field="since")
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        sid = str(row.id)
    log = ctx().events
    if live:
        alive = session_alive(sid)

        return Response(sse_body(tail(log, sid, since, alive)), 200,
                        {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, mimetype="text/event-stream")
    items = []
    trimmed = log.gap_after(sid, since or "0-0")
    if trimmed:
        items.append(gap_event(sid, since or "0-0", trimmed))
    cursor = since

    def fetch(count: int) -> list[Event]:
        nonlocal cursor
        batch = log.read(sid, cursor, count=count)
        cursor = batch[-1].id if batch else cursor
        return batch

    batch, more = fill_page(fetch, q.limit, ctx().settings.events_page_max_bytes - sum(map(frame_size, items)))
    items += batch
    next_since = items[-1].id if items and items[-1].id else since
    return {"items": [e.frame() for e in items], "next_since": next_since, "has_more": more}


def frame_size(event: Event) -> int:
    """What the event adds to a page's body: its frame as the JSON encoder writes it (ASCII), and a comma."""
    return len(frame_json(event)) + 1


def fill_page(fetch: Callable[[int], list[Event]], limit: int, budget: int) -> tuple[list[Event], bool]:
    """Up to `limit` events from `fetch(count)` (the next `count` stored events, or fewer at the end)
    whose frames fit in `budget` bytes, and whether more are left. The first event is taken whatever
    its size, so every page moves on. Read in chunks sized from the events seen so far, so a page of
    large events never holds much more than the budget in memory."""
    items: list[Event] = []
    size, want = 0, min(limit + 1, FIRST_CHUNK_EVENTS)
    while True:
        batch = fetch(want)
        for event in batch:
            cost = frame_size(event)
            if len(items) == limit or (items and size + cost > budget):
                return items, True
            items.append(event)
            size += cost
        if len(batch) < want:
            return items, False
        average = max(1, size // max(1, len(items)))
        want = max(1, min(limit + 1 - len(items), MAX_CHUNK_EVENTS, (budget - size) // average + 1))


def sse_body(events):
    """An SSE response body that ends when the client takes no data for CCD_STREAM_SEND_TIMEOUT_SECONDS."""
    return stalls.bounded(sse_stream(events), request.environ, ctx().settings.stream_send_timeout_seconds, "sse")


def tree_events(session_id: str, since: str | None, live: bool, limit: int):
    """The ?tree=true variant: ids are tree cursors, and each event names its own session."""
    positions = tree_cursor.decode_cursor(since)
    with unit_of_work() as db:
        sid = str(session_cmds.get_owned(db, g.owner, session_id).id)
    members = tree_members(sid)
    log = ctx().events
    if live:
        return Response(sse_body(tree_cursor.tail(log, members, positions)), 200,
                        {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, mimetype="text/event-stream")
    found = members() or []
    # read() moves `positions` past what it returns, so each call goes on where the last one stopped.
    items, more = fill_page(lambda count: tree_cursor.read(log, found, positions, count), limit,
                            ctx().settings.events_page_max_bytes)
    return {"items": [e.frame() for e in items], "next_since": items[-1].id if items else since,
            "has_more": more}
