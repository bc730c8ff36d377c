"""WebSocket stream of a session's events: replay from ?since (or the start), then live."""
from __future__ import annotations

import logging
import time
import uuid

from flask import request
from flask_sock import ConnectionClosed, Sock

from core.envelope import Event
from core.models import Session
from web.api import api
from web.context import ctx, unit_of_work

log = logging.getLogger(__name__)
sock = Sock()

BLOCK_MS = 1000
SESSION_CHECK_SECONDS = 5.0


def gap_event(session_id: str, since: str, trimmed_through: str) -> Event:
    return Event(session_id=session_id, type="stream.gap",
                 data={"since": since, "missing_through": trimmed_through,
                       "message": "events after `since` were trimmed; fetch turn results instead"})


def session_exists(session_id: str) -> bool:
    with unit_of_work() as db:
        row = db.get(Session, uuid.UUID(session_id))
        return row is not None and row.status != "deleted"


@sock.route("/sessions/<session_id>/stream", bp=api, endpoint="stream")
def stream(ws, session_id: str) -> None:
    """Sends every event after `since` exactly once, in order; auth ran in api.before_request."""
    events = ctx().events
    since = request.args.get("since")
    cursor = since or "0-0"
    trimmed = events.gap_after(session_id, cursor)
    try:
        if trimmed:
            ws.send(gap_event(session_id, cursor, trimmed).to_json())
        while batch := events.read(session_id, cursor):
            for event in batch:
                ws.send(event.to_json())
            cursor = batch[-1].id
        checked = time.monotonic()
        while True:
            for event in events.wait(session_id, cursor, BLOCK_MS):
                ws.send(event.to_json())
                cursor = event.id
            ws.receive(timeout=0)  # raises ConnectionClosed once the client has gone
            if time.monotonic() - checked > SESSION_CHECK_SECONDS:
                checked = time.monotonic()
                if not session_exists(session_id):
                    ws.close(reason=1000, message="session deleted")
                    return
    except ConnectionClosed:
        log.debug("stream client of session %s went away", session_id)
