"""Revoked tokens: their ids (`jti`) in Redis, per owner, each kept until the token would have expired."""
from __future__ import annotations

import time

import redis

# jti values are ours (uuid4 hex) or a client's; anything longer is not an id we would store.
MAX_JTI_LENGTH = 255


class Revocations:
    """The revocation list. Keys name the owner too, so a caller can only ever revoke its own tokens."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.redis, self.prefix = client, key_prefix

    def key(self, owner: str, jti: str) -> str:
        return f"{self.prefix}:revoked:{owner}:{jti}"

    def revoke(self, owner: str, jti: str, expires_at: int) -> bool:
        """Refuses the token from now on; False when it has expired already (nothing to remember)."""
        if expires_at <= int(time.time()):
            return False
        # EXAT: the entry goes when the token would have, so the list never outgrows the live tokens.
        self.redis.set(self.key(owner, jti), "1", exat=expires_at)
        return True

    def is_revoked(self, owner: str, jti: str) -> bool:
        return bool(self.redis.exists(self.key(owner, jti)))
