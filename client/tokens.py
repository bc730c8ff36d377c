"""Mints API tokens: HS256 JWTs with `sub`, `exp` and a random `jti`, signed with the server's JWT_SECRET."""
from __future__ import annotations

import time
import uuid

import jwt


def mint_token(secret: str, sub: str, ttl_seconds: int = 3600, now: float | None = None,
               audience: str = "", issuer: str = "") -> str:
    """A token for `sub`; give `audience`/`issuer` when the server sets JWT_AUDIENCE/JWT_ISSUER.

    The random `jti` lets the owner revoke this one token (POST /api/v1/tokens/revoke).
    """
    if not secret:
        raise ValueError("JWT_SECRET is empty: set it to the same value the server uses")
    if not sub:
        raise ValueError("sub (the token's owner) must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl must be positive")
    issued = int(now if now is not None else time.time())
    claims = {"sub": sub, "iat": issued, "exp": issued + ttl_seconds, "jti": uuid.uuid4().hex}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
