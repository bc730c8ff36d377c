"""Session events over HTTP: a page of past events as JSON, or a live SSE stream."""
from __future__ import annotations

import time
import uuid

from flask import Response, g, request

from core import sessions as session_cmds
from core import tree_events as tree_cursor
from core import trees
from core.db import transaction
from core.errors import ValidationFailed
from core.events import is_stream_id
from core.models import Session
from web.api import api, query
from web.context import ctx, unit_of_work
from web import stalls
from web.follow import gap_event, sse_stream, tail
from web.schemas import EventsQuery


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
    batch = log.read(sid, since, count=q.limit + 1)
    more = len(batch) > q.limit
    items += batch[:q.limit]
    cursor = items[-1].id if items and items[-1].id else since
    return {"items": [e.frame() for e in items], "next_since": cursor, "has_more": more}


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
    batch = tree_cursor.read(log, members() or [], positions, limit + 1)
    items = batch[:limit]
    return {"items": [e.frame() for e in items], "next_since": items[-1].id if items else since,
            "has_more": len(batch) > limit}
