"""Turn signals: how the web tier tells the worker running a turn, at once, to interrupt it ("cancel") or that one
of its approvals was answered ("answer").

A Redis list per turn rather than pub/sub, so a signal sent before the worker starts listening
still arrives; the turn row's cancel_requested_at is the durable record the worker re-checks.
"""
from __future__ import annotations

import redis

SIGNAL_TTL_SECONDS = 3600


class CancelSignals:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def key(self, turn_id: str) -> str:
        return f"{self.prefix}:cancel:{turn_id}"

    def send(self, turn_ids: list[str], signal: str = "cancel") -> None:
        """Signals each running turn in one round trip."""
        if not turn_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for turn_id in turn_ids:
            pipe.rpush(self.key(turn_id), signal)
            pipe.expire(self.key(turn_id), SIGNAL_TTL_SECONDS)
        pipe.execute()

    def wait(self, turn_id: str, timeout: float) -> str | None:
        """The next signal for the turn ("cancel", "answer") when one arrives within `timeout` seconds, else None."""
        popped = self.redis.blpop([self.key(turn_id)], timeout=timeout)
        if popped is None:
            return None
        value = popped[1]
        return value.decode() if isinstance(value, bytes) else value

    def clear(self, turn_id: str) -> None:
        self.redis.delete(self.key(turn_id))
