"""Session-scoped tokens: what an agent's in-container tools use to call the API for its own subtree."""
from __future__ import annotations

import time
import uuid

import jwt

from core.settings import TOKEN_SLACK_SECONDS  # noqa: F401 (the worker takes it from here)

SCOPE_CLAIM = "ccd_session"


def mint_session_token(secret: str, owner: str, session_id: str, ttl_seconds: int,
                       audience: str = "", issuer: str = "") -> str:
    """A token that acts for `owner`, but only on `session_id` and the sessions it spawned.

    `audience` and `issuer` (JWT_AUDIENCE, JWT_ISSUER) go in when set, since the server then requires them.
    """
    now = int(time.time())
    claims = {"sub": owner, "iat": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex, SCOPE_CLAIM: session_id}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
