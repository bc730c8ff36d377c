"""Revoked tokens: their ids (`jti`) in Redis, per owner, each kept until the token would have expired
(at most CCD_MAX_TOKEN_TTL_SECONDS), and a per-owner hourly limit on revocation requests."""
from __future__ import annotations

import time

import redis

from core.admission import OverLimit

# jti values are ours (uuid4 hex) or a client's; anything longer is not an id we would store.
MAX_JTI_LENGTH = 255
RATE_WINDOW_SECONDS = 3600


class Revocations:
    """The revocation list. Keys name the owner too, so a caller can only ever revoke its own tokens."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.redis, self.prefix = client, key_prefix

    def key(self, owner: str, jti: str) -> str:
        return f"{self.prefix}:revoked:{owner}:{jti}"

    def revoke(self, owner: str, jti: str, expires_at: int, max_ttl: int) -> int | None:
        """Refuses the token from now on; returns when the entry expires, or None when the token has
        expired already (nothing to remember).

        The entry goes when the token would have, or `max_ttl` from now if sooner: the server refuses
        tokens that live longer than that (web/auth.decode_token), so no token it would still accept
        outlives the entry, and a made-up `exp` in the far future cannot write a key that never expires.
        """
        now = int(time.time())
        if expires_at <= now:
            return None
        until = min(expires_at, now + max_ttl)
        self.redis.set(self.key(owner, jti), "1", exat=until)
        return until

    def is_revoked(self, owner: str, jti: str) -> bool:
        return bool(self.redis.exists(self.key(owner, jti)))

    def admit(self, owner: str, per_hour: int) -> None:
        """Counts one revocation request of the owner's; OverLimit (429) past `per_hour` in this clock hour."""
        now = int(time.time())
        window = now // RATE_WINDOW_SECONDS
        key = f"{self.prefix}:revoke-rate:{owner}:{window}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, RATE_WINDOW_SECONDS, nx=True)
        count, _ = pipe.execute()
        if count > per_hour:
            raise OverLimit(f"you made {per_hour} revocation requests this hour, the most allowed "
                            "(CCD_OWNER_REVOCATIONS_PER_HOUR); retry later", code="revocation_limit",
                            retry_after=(window + 1) * RATE_WINDOW_SECONDS - now, limit=per_hour)
