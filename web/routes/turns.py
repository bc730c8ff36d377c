"""Turn routes: chat (answer at once, wait for the end, or stream it), list, show, cancel."""
from __future__ import annotations

import json
import time
import uuid

from flask import Response, g, request

from core import admission
from core import sessions as session_cmds
from core import turns as turn_cmds
from core.db import transaction
from core.errors import DomainError
from core.models import FINISHED_TURN_STATUSES, Turn
from core.resources import turn_body
from core.webhooks import check_enabled, check_url
from web.api import (api, claim_idempotency_key, enqueue, json_body, page, query,
                     remember_idempotency_key)
from web.auth import refuse_agent_webhook
from web.context import ctx, unit_of_work
from web import stalls
from web.follow import FINAL_TYPES, SSE_HEARTBEAT, sse_frame, turn_events
from web.hub import SlowClient, frame_json
from web.metrics import STREAM_DROPPED, LagMeter
from web.routes.sessions import after_turns_ended
from web.schemas import ChatRequest, PageQuery, TurnQuery

# A final event is published just before the turn row is updated; allow the row that long.
ROW_CATCH_UP_SECONDS = 2.0


@api.post("/sessions/<session_id>/chat")
def chat(session_id: str):
    """Queues a turn behind the session's earlier ones; answers at once, after `wait`, or as a stream."""
    spec = json_body(ChatRequest)
    settings = ctx().settings
    body = submit_chat(g.claims, session_id, spec, idempotent=True)
    if spec.stream:
        return stream_turn(body)
    if spec.wait:
        return wait_for_turn(body, min(spec.wait, settings.max_wait_seconds))
    return body, 202, {"Location": body["links"]["self"]}


def submit_chat(claims: dict, session_id: str, spec: ChatRequest, idempotent: bool = False) -> dict:
    """Queues the turn for the token's owner (or finds the one an earlier request with the same key queued)."""
    settings, owner = ctx().settings, claims["sub"]
    refuse_agent_webhook(claims, spec.webhook)
    if spec.webhook:
        check_enabled(settings.webhooks_enabled)
        check_url(spec.webhook, settings.webhook_allow_private)
    host_queue = None
    with unit_of_work() as db:
        # wait and stream shape the answer, not the turn: a retry may switch between them.
        what = json.dumps(spec.model_dump(exclude={"wait", "stream"}), sort_keys=True).encode()
        prior = claim_idempotency_key(db, what) if idempotent else None
        if prior is not None:
            turn = turn_cmds.get_owned_turn(db, owner, str(prior.resource_id))
            position = turn_cmds.queue_positions(db, {turn.session_id}).get(turn.id)
        else:
            row = session_cmds.get_owned(db, owner, session_id, lock=True)
            if row.status == "stopped":  # this turn starts it again: it must fit the owner's limits
                admission.admit_restart(db, row, settings)
            queued, running = turn_cmds.turns_in_flight(db, row.id)
            idle = not (queued or running)
            admission.admit_turn(db, owner, settings, session_idle=idle)
            turn = turn_cmds.queue_turn(db, row, spec.prompt, webhook=spec.webhook)
            # Published under the session lock, so turn.queued always precedes turn.started.
            turn.queued_event_id = ctx().events.publish(turn_cmds.queued_event(turn))
            if idempotent:
                remember_idempotency_key(db, "turn", turn.id, 202)
            # Behind another turn, the worker that ends that one sends this one (under the same session lock,
            # so it sees this turn): a task now would only be dropped as not the session's next.
            host_queue = row.host_queue if idle else None
            position = queued + 1  # last in the session's queue
        body = turn_body(turn, position)
    if host_queue:
        enqueue(ctx().sender.run_turn, body["id"], host_queue)
    return body


def cancel(owner: str, turn_id: str, session_id: str | None = None) -> tuple[dict, bool]:
    """Cancels a turn (of `session_id` only, when given); True when it ended now (it was queued), False
    when its worker was signalled."""
    with unit_of_work() as db:
        turn = turn_cmds.get_owned_turn(db, owner, turn_id)
        if session_id is not None and str(turn.session_id) != session_id:  # checked before anything is done
            raise DomainError("that turn belongs to another session", code="wrong_session")
        session_cmds.get_owned(db, owner, str(turn.session_id), lock=True)
        db.refresh(turn)  # as it is now that no worker can claim it under us
        ended = turn_cmds.request_cancel(db, turn)
        if ended is not None:
            turn.last_event_id = ctx().events.publish(ended)
        body = turn_body(turn)
    done = ended is not None
    after_turns_ended([turn] if done else [], [] if done else [body["id"]])
    return body, done


def turn_is_running(turn_id: str):
    """A check that runs outside the request (inside a streaming response)."""
    db_factory = ctx().db

    def running() -> bool:
        with transaction(db_factory) as db:
            row = db.get(Turn, uuid.UUID(turn_id))
            return row is not None and row.status not in FINISHED_TURN_STATUSES
    return running


def wait_for_turn(body: dict, seconds: int):
    """Holds the request until the turn ends (200, final turn) or `seconds` pass (202, turn as it is)."""
    if body["status"] not in FINISHED_TURN_STATUSES and body["queued_event_id"]:
        deadline = time.monotonic() + seconds
        for event in turn_events(ctx().events, body["session_id"], body["id"], body["queued_event_id"],
                                 turn_is_running(body["id"]), deadline, rejoin=True):
            if event is not None and event.type in FINAL_TYPES:
                break
        give_up = min(deadline, time.monotonic() + ROW_CATCH_UP_SECONDS)
        while True:
            body = current_turn(body["id"])
            if body["status"] in FINISHED_TURN_STATUSES or time.monotonic() >= give_up:
                break
            time.sleep(0.05)
    status = 200 if body["status"] in FINISHED_TURN_STATUSES else 202
    return body, status, {"Location": body["links"]["self"]}


def current_turn(turn_id: str) -> dict:
    with unit_of_work() as db:
        turn = turn_cmds.get_owned_turn(db, g.owner, turn_id)
        return turn_body(turn, turn_cmds.queue_positions(db, {turn.session_id}).get(turn.id))


def stream_turn(body: dict) -> Response:
    """The turn's events as they happen, NDJSON (or SSE when asked), ending after its final event."""
    sse = request.accept_mimetypes.best_match(["application/x-ndjson", "text/event-stream"]) == "text/event-stream"
    events, running = ctx().events, turn_is_running(body["id"])
    start = body["queued_event_id"] or "0-1"  # turns queued before event ids were recorded: from the start

    followed = turn_events(events, body["session_id"], body["id"], start, running)  # here: it reads the settings

    def frames():
        lag = LagMeter("sse" if sse else "ndjson")
        try:
            for event in followed:
                if event is None:
                    if sse:
                        yield SSE_HEARTBEAT
                    continue
                yield sse_frame(event) if sse else frame_json(event) + "\n"
                lag.delivered(event)
        except SlowClient as exc:  # the last line says why and where to resume (GET /sessions/{id}/events)
            STREAM_DROPPED.labels("sse" if sse else "ndjson").inc()
            error = {"code": "slow_client", "message": str(exc), "resume_since": exc.last_id}
            yield f": {exc}\n\n" if sse else json.dumps({"error": error}) + "\n"

    headers = {"Location": body["links"]["self"], "X-Turn-Id": body["id"], "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
    body = stalls.bounded(frames(), request.environ, ctx().settings.stream_send_timeout_seconds,
                          "sse" if sse else "ndjson")
    return Response(body, 200, headers, mimetype="text/event-stream" if sse else "application/x-ndjson")


@api.get("/sessions/<session_id>/turns")
def list_turns(session_id: str):
    q = query(PageQuery)
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        rows, total = turn_cmds.list_turns(db, row.id, q.limit, q.offset)
        positions = turn_cmds.queue_positions(db, {row.id})
        return page([turn_body(t, positions.get(t.id)) for t in rows], total, q)


@api.get("/turns/<turn_id>")
def get_turn(turn_id: str):
    """The turn; with ?wait=N the answer waits up to N seconds for it to end."""
    q = query(TurnQuery)
    body = current_turn(turn_id)
    if q.wait:
        body, _, _ = wait_for_turn(body, min(q.wait, ctx().settings.max_wait_seconds))
    return body


@api.post("/turns/<turn_id>/cancel")
def cancel_turn(turn_id: str):
    """A queued turn is cancelled at once (200); a running one is interrupted by its worker (202)."""
    body, ended = cancel(g.owner, turn_id)
    return body, 200 if ended else 202
