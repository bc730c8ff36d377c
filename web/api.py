"""REST API for sessions and turns: parse, call a core command, commit, enqueue, respond."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import redis
from flask import Blueprint, g, request
from kombu.exceptions import OperationalError as BrokerDown
from pydantic import BaseModel, ValidationError

from core import sessions as session_cmds
from core import turns as turn_cmds
from core.envelope import Event, status_event
from core.errors import DomainError, ValidationFailed
from core.events import is_stream_id
from web.auth import authenticate
from web.context import ctx, unit_of_work
from web.errors import validation_response
from web.schemas import (ChatRequest, CreateSession, PageQuery, SessionListQuery, session_body,
                         turn_body)

log = logging.getLogger(__name__)
api = Blueprint("api", __name__, url_prefix="/api/v1")
M = TypeVar("M", bound=BaseModel)
STREAM_ENDPOINT = "api.stream"


@api.before_request
def _authenticate():
    """Every API call needs a token; the WebSocket may carry it as ?token= (browsers send no headers)."""
    is_stream = request.endpoint == STREAM_ENDPOINT
    owner = authenticate(ctx().settings.jwt_secret, allow_query=is_stream)
    if is_stream:  # refuse before the WebSocket handshake, while a status code can still be sent
        since = request.args.get("since")
        if since and not is_stream_id(since):
            raise ValidationFailed("since must be an event id like 1732450000000-0", field="since")
        with unit_of_work() as db:
            session_cmds.get_owned(db, owner, request.view_args["session_id"])


def json_body(model: type[M]) -> M:
    """The request's JSON object, validated; an empty body counts as {}."""
    if not request.get_data(cache=True):
        data: object = {}
    elif not request.is_json:
        raise DomainError("send JSON with Content-Type: application/json", code="unsupported_media_type")
    else:
        data = request.get_json(silent=True)
        if data is None:
            raise ValidationFailed("the body is not valid JSON", code="invalid_json")
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", code="invalid_json")
    return model.model_validate(data)


def query(model: type[M]) -> M:
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        raise QueryError(exc) from None


class QueryError(Exception):
    def __init__(self, exc: ValidationError) -> None:
        self.exc = exc


@api.errorhandler(QueryError)
def _query_error(err: QueryError):
    return validation_response(err.exc, prefix="query.")


def enqueue(send: Callable[..., None], *args) -> None:
    """Sends a task for work already committed. When the broker is down the request still
    succeeds: the row is the promise, and the reaper sends the task once the broker is back."""
    try:
        send(*args)
    except (BrokerDown, redis.RedisError) as exc:
        log.warning("could not enqueue %s%s (%s); the reaper will retry", send.__name__, args, exc)


def page(items: list, total: int, q: PageQuery) -> dict:
    nxt = q.offset + q.limit
    return {"items": items, "total": total, "limit": q.limit, "offset": q.offset,
            "next_offset": nxt if nxt < total else None}


@api.post("/sessions")
def create_session():
    """Records a new session and asks a worker to start its container."""
    spec = json_body(CreateSession)
    with unit_of_work() as db:
        row = session_cmds.create_session(db, g.owner, spec.config.model_dump(),
                                          spec.workspace.model_dump())
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
        return session_body(row, turn_cmds.latest_turn(db, row.id), with_latest=True)


@api.post("/sessions/<session_id>/chat")
def chat(session_id: str):
    """Queues a turn; it runs after the session's earlier turns, on the session's host."""
    spec = json_body(ChatRequest)
    events = ctx().events
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        turn = turn_cmds.submit_turn(db, row, spec.prompt)
        # Published under the session lock, so turn.queued always precedes turn.started.
        events.publish(Event(session_id=str(row.id), turn_id=str(turn.id), seq=turn.seq,
                             type="turn.queued", data={"status": "queued"}))
        body, host_queue = turn_body(turn), row.host_queue
    if host_queue:
        enqueue(ctx().sender.run_turn, body["id"], host_queue)
    return body, 202, {"Location": body["links"]["self"]}


@api.get("/sessions/<session_id>/turns")
def list_turns(session_id: str):
    q = query(PageQuery)
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id)
        rows, total = turn_cmds.list_turns(db, row.id, q.limit, q.offset)
        return page([turn_body(t) for t in rows], total, q)


@api.get("/turns/<turn_id>")
def get_turn(turn_id: str):
    with unit_of_work() as db:
        return turn_body(turn_cmds.get_owned_turn(db, g.owner, turn_id))


def _wind_down(session_id: str, command) -> tuple[dict, str | None]:
    """Runs a stop/delete command under the session lock and publishes what it cancelled."""
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        cancelled = command(db, row)
        events = [Event(session_id=str(row.id), turn_id=str(t.id), seq=t.seq, type="turn.cancelled",
                        data={"status": "cancelled", "error": t.error}) for t in cancelled]
        events.append(status_event(str(row.id), row.status))
        ctx().events.publish_many(events)
        return session_body(row), row.host_queue


@api.post("/sessions/<session_id>/stop")
def stop_session(session_id: str):
    """Stops the container; the next chat starts it again with the workspace and conversation kept."""
    body, host_queue = _wind_down(session_id, session_cmds.request_stop)
    if body["status"] == "stopping":
        enqueue(ctx().sender.stop_session, body["id"], host_queue)
    return body, 202


@api.delete("/sessions/<session_id>")
def delete_session(session_id: str):
    """Removes the container, volumes and events; the row stays, marked deleted."""
    body, host_queue = _wind_down(session_id, session_cmds.request_delete)
    enqueue(ctx().sender.delete_session, body["id"], host_queue)
    return body, 202
