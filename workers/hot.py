"""The host's idle hot Claude Code processes: at most CCD_MAX_HOT_PER_HOST stay up; the least recently used go
first. A sorted set per host in Redis (session id by the time its last turn ended), shared by the host's workers."""
from __future__ import annotations

import logging
import time

import redis

from workers.runtime import NotRunning

log = logging.getLogger(__name__)


class HotSessions:
    def __init__(self, client: redis.Redis, settings) -> None:
        self.redis, self.settings = client, settings
        self.key = f"{settings.key_prefix}:hot:{settings.host_name}"

    def idle(self, session_id: str) -> list[str]:
        """Notes that the session's process went idle now; the sessions to cool so the host keeps its limit."""
        now, limit = time.time(), self.settings.hot_limit
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.key, {session_id: now})
        pipe.zremrangebyscore(self.key, "-inf", now - self.settings.hot_seconds)  # their processes ended themselves
        pipe.zrange(self.key, 0, -1)
        members = pipe.execute()[2]
        members = [m.decode() if isinstance(m, bytes) else m for m in members]
        over = max(0, len(members) - limit)
        evicted = [m for m in members if m != session_id][:over]
        if evicted:
            self.redis.zrem(self.key, *evicted)
        return evicted

    def forget(self, session_id: str) -> None:
        self.redis.zrem(self.key, session_id)


def cool(runtime, hot: HotSessions, session_ids: list[str]) -> None:
    """Ends these sessions' idle processes (a session whose turn runs keeps its own: it is not idle)."""
    for session_id in session_ids:
        try:
            outcome = runtime.agent_control(runtime.container_name(session_id), {"control": "cool"})
            log.info("session %s: hot process ended for the host's limit (%s)", session_id, outcome)
        except NotRunning:
            pass
        except Exception as exc:  # it ends by itself after CCD_HOT_SECONDS anyway
            log.warning("session %s: could not end its hot process: %s", session_id, exc)
