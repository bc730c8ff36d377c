"""The API blueprint and what its views share: auth, body and query parsing, enqueueing,
paging, idempotency keys. The routes live in web/routes/, one module per resource."""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

import redis
from flask import Blueprint, g, request
from kombu.exceptions import OperationalError as BrokerDown
from pydantic import BaseModel, ValidationError

from sqlalchemy.orm import Session as DbSession
from werkzeug.exceptions import RequestEntityTooLarge

from core import idempotency
from core import sessions as session_cmds
from core.errors import DomainError, ValidationFailed
from core.events import is_stream_id
from core.revocations import Revocations
from core.session_tokens import SCOPE_CLAIM
from web.auth import authenticate, check_scope
from web.context import ctx, unit_of_work
from web.errors import validation_response
from web.schemas import PageQuery

log = logging.getLogger(__name__)
api = Blueprint("api", __name__, url_prefix="/api/v1")
M = TypeVar("M", bound=BaseModel)
STREAM_ENDPOINT = "api.stream"
# Browsers cannot set headers on a WebSocket or an EventSource: these take ?token= too.
QUERY_TOKEN_ENDPOINTS = (STREAM_ENDPOINT, "api.events")


def revocations() -> Revocations:
    """The revoked-token list of this app's Redis and key prefix."""
    return Revocations(ctx().events.redis, ctx().settings.key_prefix)


@api.before_request
def _authenticate():
    """Every API call needs a token; the WebSocket and SSE may carry it as ?token= (browsers send no
    headers there). Runs before the WebSocket handshake, so a bad token is a 401, not an upgrade."""
    is_stream = request.endpoint == STREAM_ENDPOINT
    claims = authenticate(ctx().settings, revocations(), allow_query=request.endpoint in QUERY_TOKEN_ENDPOINTS)
    owner = claims["sub"]
    g.token_scope = claims.get(SCOPE_CLAIM)
    if SCOPE_CLAIM in claims:
        with unit_of_work() as db:
            check_scope(db, claims)
    if is_stream:  # refuse before the WebSocket handshake, while a status code can still be sent
        since = request.args.get("since")
        if since and not is_stream_id(since):
            raise ValidationFailed("since must be an event id like 1732450000000-0", field="since")
        with unit_of_work() as db:
            session_cmds.get_owned(db, owner, request.view_args["session_id"])


def body_bytes() -> bytes:
    """The whole body; 413 past request.max_content_length, chunked bodies (no Content-Length) too.

    Werkzeug stops reading a chunked body quietly at the limit, which would hand the view a truncated
    body (an NDJSON batch cut at a line would even parse). So read one byte more and look.
    """
    limit = request.max_content_length
    if limit is None:
        return request.get_data(cache=True)
    request.max_content_length = limit + 1  # before the stream is made: it takes the limit then
    try:
        data = request.get_data(cache=True)
    finally:
        request.max_content_length = limit  # what the 413 reports
    if len(data) > limit:
        raise RequestEntityTooLarge()
    return data


def json_data() -> object:
    """The request's parsed JSON; an empty body counts as {}."""
    if not body_bytes():
        return {}
    if not request.is_json:
        raise DomainError("send JSON with Content-Type: application/json", code="unsupported_media_type")
    data = request.get_json(silent=True)
    if data is None:
        raise ValidationFailed("the body is not valid JSON", code="invalid_json")
    return data


def json_body(model: type[M]) -> M:
    """The request's JSON object, validated."""
    data = json_data()
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", code="invalid_json")
    return model.model_validate(data)


class PageTooLarge(DomainError):
    status = 422
    code = "page_too_large"


def query(model: type[M]) -> M:
    """The query string, validated; errors name the parameter as query.<name>. A page size over
    its cap is a 422 `page_too_large` naming the cap, so a client knows what to ask for instead."""
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        for err in exc.errors():
            if err["loc"] == ("limit",) and err["type"] == "less_than_equal":
                raise PageTooLarge(f"limit may be at most {err['ctx']['le']}", field="query.limit") from None
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
    shown = f"{send.__name__}({', '.join(repr(a) for a in args if not isinstance(a, dict))})"  # ids, not a config
    try:
        send(*args)
    except (BrokerDown, redis.RedisError) as exc:
        log.warning("could not enqueue %s (%s); the reaper will retry", shown, exc)
    except Exception:  # committed work must not turn into an error answer; the reaper catches up
        log.exception("follow-up %s failed after commit; the reaper will retry", shown)


def page(items: list, total: int, q: PageQuery) -> dict:
    nxt = q.offset + q.limit
    return {"items": items, "total": total, "limit": q.limit, "offset": q.offset,
            "next_offset": nxt if nxt < total else None}


def claim_idempotency_key(db: DbSession, what: bytes | None = None) -> idempotency.Prior | None:
    """With an Idempotency-Key header: the earlier request's result, or None after taking the key.

    `what` is what identifies the request (the raw body unless given).
    """
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    return idempotency.claim(db, g.owner, key, idempotency.fingerprint(
        request.method, request.path, request.get_data(cache=True) if what is None else what))


def remember_idempotency_key(db: DbSession, resource_type: str, resource_id, status: int) -> None:
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        idempotency.remember(db, g.owner, key, resource_type, resource_id, status)
