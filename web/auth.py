"""JWT authentication: HS256 bearer tokens with `sub` and `exp`, from the header or ?token=."""
from __future__ import annotations

import jwt
from flask import g, request

from core.errors import Unauthorized

ALGORITHM = "HS256"


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


def authenticate(secret: str, allow_query: bool = False) -> str:
    """Checks the request's token and remembers its owner in g.owner."""
    g.owner = decode_token(token_from_request(allow_query), secret)["sub"]
    return g.owner
