"""Session routes: create, list, show, stop, delete."""
from __future__ import annotations

from flask import g

from core import admission
from core import sessions as session_cmds
from core import turns as turn_cmds
from core.envelope import status_event
from core.resources import session_body, turn_body
from web.api import (api, claim_idempotency_key, enqueue, json_body, page, query,
                     remember_idempotency_key)
from web.context import ctx, unit_of_work
from web.schemas import CreateSession, SessionListQuery


@api.post("/sessions")
def create_session():
    """Records a new session and asks a worker to start its container."""
    spec = json_body(CreateSession)
    with unit_of_work() as db:
        prior = claim_idempotency_key(db)
        if prior is not None:
            body = session_body(session_cmds.get_owned(db, g.owner, str(prior.resource_id)))
            return body, prior.status_code, {"Location": body["links"]["self"]}
        admission.admit_session(db, g.owner, ctx().settings)
        row = session_cmds.create_session(db, g.owner, spec.config.model_dump(),
                                          spec.workspace.model_dump())
        remember_idempotency_key(db, "session", row.id, 201)
        body = session_body(row)
    enqueue(ctx().sender.start_session, body["id"])
    return body, 201, {"Location": body["links"]["self"]}


@api.get("/sessions")
def list_sessions():
    q = query(SessionListQuery)
    with unit_of_work() as db:
        rows, total = session_cmds.list_owned(db, g.owner, q.status, q.limit, q.offset)
        return page([session_body(r) for r in rows], total, q)


@api.get("/sessions/<session_id>")
def get_session(session_id: str):
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        latest = turn_cmds.latest_turn(db, row.id)
        positions = turn_cmds.queue_positions(db, {row.id}) if latest is not None else {}
        latest_body = turn_body(latest, positions.get(latest.id)) if latest is not None else None
        return session_body(row, latest_body, with_latest=True)


def wind_down(session_id: str, command) -> tuple[dict, str | None]:
    """Runs a stop/delete command under the session lock: its queued turns are cancelled at once,
    its running turn is signalled to stop, and the status change is published."""
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        cancelled = command(db, row)
        running = turn_cmds.cancel_running_turns(db, row.id)
        events = [turn_cmds.ended_event(t) for t in cancelled] + [status_event(str(row.id), row.status)]
        ctx().events.publish_many(events)
        body, host_queue = session_body(row), row.host_queue
    after_turns_ended(cancelled, running)
    return body, host_queue


def after_turns_ended(ended: list, running: list[str]) -> None:
    """Signals running turns to stop, sends the webhooks of turns that ended, moves their batches on."""
    ctx().cancels.send(running)
    for turn in ended:
        if turn.webhook:
            enqueue(ctx().sender.deliver_webhook, "turn", str(turn.id))
    batch_ids = list({turn.batch_id for turn in ended if turn.batch_id})
    if batch_ids:
        enqueue(ctx().advance_batches, batch_ids)


@api.post("/sessions/<session_id>/stop")
def stop_session(session_id: str):
    """Stops the container; the next chat starts it again with the workspace and conversation kept."""
    body, host_queue = wind_down(session_id, session_cmds.request_stop)
    if body["status"] == "stopping":
        enqueue(ctx().sender.stop_session, body["id"], host_queue)
    return body, 202


@api.delete("/sessions/<session_id>")
def delete_session(session_id: str):
    """Removes the container, volumes and events; the row stays, marked deleted."""
    body, host_queue = wind_down(session_id, session_cmds.request_delete)
    enqueue(ctx().sender.delete_session, body["id"], host_queue)
    return body, 202
