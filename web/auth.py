"""JWT authentication: HS256 bearer tokens with `sub` and `exp`, from the header or ?token=.

A token with a `ccd_session` claim (minted for an agent's in-container tools) reaches only
that session and the sessions below it, through the endpoints in SCOPED_ENDPOINTS, and only
while that session is live.
"""
from __future__ import annotations

import uuid

import jwt
from flask import g, request
from sqlalchemy import select

from core import trees
from core.errors import DomainError, NotFound, Unauthorized
from core.models import Session, Turn
from core.session_tokens import SCOPE_CLAIM

ALGORITHM = "HS256"
SCOPED_ENDPOINTS = frozenset({
    "api.get_session", "api.spawn", "api.list_children", "api.chat", "api.list_turns", "api.get_turn",
    "api.cancel_turn", "api.events", "api.stream", "api.stop_session", "api.delete_session",
})


class OutOfScope(DomainError):
    status = 403
    code = "token_scope"


def decode_token(token: str, secret: str) -> dict:
    """The token's claims; Unauthorized for a bad signature, another algorithm, or a missing claim."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired; mint a new one (ccd token)", code="token_expired") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise Unauthorized("invalid token: sub must be a non-empty string", code="invalid_token")
    return claims


def token_from_request(allow_query: bool) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query and request.args.get("token"):
        return request.args["token"]
    raise Unauthorized("missing credentials: send Authorization: Bearer <token>", code="missing_token")


def authenticate(secret: str, allow_query: bool = False) -> dict:
    """Checks the request's token, remembers its owner in g.owner; returns its claims."""
    claims = decode_token(token_from_request(allow_query), secret)
    g.owner = claims["sub"]
    return claims


def check_scope(db, claims: dict) -> None:
    """For a session-scoped token: the endpoint is one it may use, on its own subtree, while live."""
    scope = claims.get(SCOPE_CLAIM)
    if scope is None:
        return
    try:
        top = uuid.UUID(str(scope))
    except ValueError:
        raise Unauthorized("invalid token: bad session scope", code="invalid_token") from None
    holder = db.get(Session, top)
    if holder is None or holder.owner != g.owner or holder.status in ("stopping", "stopped", "failed", "deleted"):
        raise Unauthorized("this session token ended with its session", code="token_expired")
    if request.endpoint not in SCOPED_ENDPOINTS:
        raise OutOfScope("a session token may only reach its own session and the sessions it spawned")
    args = request.view_args or {}
    target = args.get("session_id")
    if target is None and "turn_id" in args:
        target = db.scalar(select(Turn.session_id).where(Turn.id == _uuid(args["turn_id"], "turn")))
    if target is None or not trees.in_subtree(db, top, _uuid(str(target), "session")):
        raise NotFound(f"no session or turn with id {args.get('session_id') or args.get('turn_id')}")


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} with id {value}") from None
