"""Session-scoped tokens: what an agent's in-container tools use to call the API for its own subtree."""
from __future__ import annotations

import time

import jwt

SCOPE_CLAIM = "ccd_session"


def mint_session_token(secret: str, owner: str, session_id: str, ttl_seconds: int) -> str:
    """A token that acts for `owner`, but only on `session_id` and the sessions it spawned."""
    now = int(time.time())
    return jwt.encode({"sub": owner, "iat": now, "exp": now + ttl_seconds, SCOPE_CLAIM: session_id},
                      secret, algorithm="HS256")
