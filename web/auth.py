"""JWT authentication: HS256 bearer tokens (from the header, or ?token= where browsers need it),
checked for signature, algorithm, `exp`/`nbf`, `sub`, the configured `aud`/`iss`, and revocation.

A token with a `ccd_session` claim (minted for an agent's in-container tools) reaches only
that session and the sessions below it, through the endpoints in SCOPED_ENDPOINTS, and only
while that session is live; it may not set a webhook or answer approvals. A token may live at most
CCD_MAX_TOKEN_TTL_SECONDS (from its `iat`, or from now without one).
"""
from __future__ import annotations

import logging
import time
import uuid

import jwt
import redis
from flask import g, request
from sqlalchemy import select

from core import trees
from core.db import transaction
from core.errors import DomainError, NotFound, Unauthorized
from core.models import Session, Turn
from core.revocations import MAX_JTI_LENGTH, Revocations
from core.session_tokens import SCOPE_CLAIM
from core.settings import Settings

log = logging.getLogger(__name__)
# One algorithm, fixed here and never taken from the token: no `none`, no RS/HS confusion.
ALGORITHM = "HS256"
ENDED_HOLDER_STATES = ("stopping", "stopped", "failed", "deleted")
SCOPED_ENDPOINTS = frozenset({
    "api.get_session", "api.spawn", "api.list_children", "api.chat", "api.list_turns", "api.get_turn",
    "api.cancel_turn", "api.events", "api.stream", "api.stop_session", "api.delete_session", "api.list_approvals",
})
# Endpoints only the owner's own tokens may use, with what a session token is refused (403 `forbidden`).
OWNER_ONLY_ENDPOINTS = {"api.answer_approval": "answer approvals"}


class OutOfScope(DomainError):
    status = 403
    code = "token_scope"


def decode_token(token: str, secret: str, audience: str = "", issuer: str = "", max_ttl: int = 0) -> dict:
    """The token's claims; Unauthorized (with a stable code) for anything but a valid, current token.

    `audience` and `issuer`, when not empty, must match the token's `aud` and `iss`, which are then required.
    `max_ttl` (seconds, 0 for none) bounds the token's lifetime: `exp - iat`, or `exp - now` without `iat`.
    """
    required = ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], audience=audience or None,
                            issuer=issuer or None,
                            options={"require": required, "verify_aud": bool(audience)})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired; mint a new one (ccd token)", code="token_expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("token not valid yet (nbf or iat in the future)", code="token_not_yet_valid") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"invalid token: {exc}", code="invalid_token") from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise Unauthorized("invalid token: sub must be a non-empty string", code="invalid_token")
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH):
        raise Unauthorized(f"invalid token: jti must be a string of 1 to {MAX_JTI_LENGTH} characters",
                           code="invalid_token")
    # The bound is what lets a revocation entry expire (core/revocations.py): no accepted token outlives it.
    issued = claims.get("iat") if isinstance(claims.get("iat"), (int, float)) else time.time()
    if max_ttl and claims["exp"] - issued > max_ttl:
        raise Unauthorized(f"invalid token: it lives longer than CCD_MAX_TOKEN_TTL_SECONDS ({max_ttl} s); "
                           "mint a shorter one", code="invalid_token")
    return claims


def token_from_request(allow_query: bool) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query and request.args.get("token"):
        return request.args["token"]
    raise Unauthorized("missing credentials: send Authorization: Bearer <token>", code="missing_token")


def authenticate(settings: Settings, revocations: Revocations, allow_query: bool = False) -> dict:
    """Checks the request's token, remembers its owner in g.owner and its claims in g.claims."""
    claims = decode_token(token_from_request(allow_query), settings.jwt_secret,
                          settings.jwt_audience, settings.jwt_issuer, settings.max_token_ttl_seconds)
    if "jti" in claims and is_revoked(revocations, claims):
        raise Unauthorized("this token was revoked; mint a new one (ccd token)", code="token_revoked")
    g.owner, g.claims = claims["sub"], claims
    return claims


def is_revoked(revocations: Revocations, claims: dict) -> bool:
    """Whether the token's jti is on the list. While Redis does not answer, the list cannot be read and
    the token passes (logged): the API keeps taking work without Redis, and refusing every token then
    would turn a Redis outage into a full one."""
    try:
        return revocations.is_revoked(claims["sub"], claims["jti"])
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("cannot check token %s of %s for revocation (%s); letting it through",
                    claims["jti"], claims["sub"], exc)
        return False


def check_scope(db, claims: dict) -> None:
    """For a session-scoped token: the endpoint is one it may use, on its own subtree, while live."""
    if claims.get(SCOPE_CLAIM) is None:
        return
    top = scope_holder(db, claims)
    if request.endpoint in OWNER_ONLY_ENDPOINTS:
        refuse_agent(claims, OWNER_ONLY_ENDPOINTS[request.endpoint])
    if request.endpoint not in SCOPED_ENDPOINTS:
        raise OutOfScope("a session token may only reach its own session and the sessions it spawned")
    args = request.view_args or {}
    target = args.get("session_id")
    if target is None and "turn_id" in args:
        target = db.scalar(select(Turn.session_id).where(Turn.id == _uuid(args["turn_id"], "turn")))
    if target is None or not trees.in_subtree(db, top, _uuid(str(target), "session")):
        raise NotFound(f"no session or turn with id {args.get('session_id') or args.get('turn_id')}")


def scope_holder(db, claims: dict) -> uuid.UUID:
    """The session a session-scoped token was minted for; token_expired once that session ended."""
    try:
        top = uuid.UUID(str(claims[SCOPE_CLAIM]))
    except ValueError:
        raise Unauthorized("invalid token: bad session scope", code="invalid_token") from None
    holder = db.get(Session, top)
    if holder is None or holder.owner != claims["sub"] or holder.status in ENDED_HOLDER_STATES:
        raise Unauthorized("this session token ended with its session", code="token_expired")
    return top


def recheck(db_factory, revocations: Revocations, claims: dict, session_id: str) -> None:
    """The handshake's checks again, for a connection that outlives it: the token has not expired or
    been revoked since, and a session token's session is live and still reaches `session_id`."""
    if claims["exp"] <= time.time():
        raise Unauthorized("token expired; mint a new one (ccd token)", code="token_expired")
    if "jti" in claims and is_revoked(revocations, claims):
        raise Unauthorized("this token was revoked; mint a new one (ccd token)", code="token_revoked")
    if claims.get(SCOPE_CLAIM) is None:
        return
    with transaction(db_factory) as db:
        top = scope_holder(db, claims)
        if not trees.in_subtree(db, top, _uuid(session_id, "session")):
            raise NotFound(f"no session with id {session_id}")


def refuse_agent_webhook(claims: dict, webhook: str | None) -> None:
    """A session token may not set a webhook: its delivery would carry the owner's results to a server
    of the agent's choosing."""
    if webhook is not None and claims.get(SCOPE_CLAIM) is not None:
        raise OutOfScope("a session token may not set a webhook; only the owner's tokens may", field="webhook")


def refuse_agent(claims: dict, what: str) -> None:
    """A session token may not answer approvals: the agent would be granting its own tool uses (or its
    children's); the owner decides."""
    if claims.get(SCOPE_CLAIM) is not None:
        raise OutOfScope(f"a session token may not {what}; only the owner's tokens may", code="forbidden")


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no {what} with id {value}") from None
