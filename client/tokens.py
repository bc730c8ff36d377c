"""Mints API tokens: HS256 JWTs with `sub` and `exp`, signed with the server's JWT_SECRET."""
from __future__ import annotations

import time

import jwt


def mint_token(secret: str, sub: str, ttl_seconds: int = 3600, now: float | None = None) -> str:
    if not secret:
        raise ValueError("JWT_SECRET is empty: set it to the same value the server uses")
    if not sub:
        raise ValueError("sub (the token's owner) must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl must be positive")
    issued = int(now if now is not None else time.time())
    return jwt.encode({"sub": sub, "iat": issued, "exp": issued + ttl_seconds}, secret, algorithm="HS256")
