"""The event envelope: the one frame shape every client receives, from any endpoint."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

# Event types cc-docker itself emits; a Claude Code line becomes "claude.<its type>".
SERVICE_TYPES = frozenset({
    "session.status", "turn.queued", "turn.started", "turn.completed", "turn.failed",
    "turn.cancelled", "stream.gap", "approval.requested", "approval.resolved",
})


class EnvelopeError(ValueError):
    """Raised when bytes from a stream are not a valid envelope."""


def now_iso() -> str:
    """UTC now, millisecond precision, the way Claude Code stamps its lines."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_valid_type(kind: str) -> bool:
    return kind in SERVICE_TYPES or (kind.startswith("claude.") and len(kind) > len("claude."))


@dataclass(frozen=True)
class Event:
    """One event of a session's stream; `id` is its Redis stream id once stored."""

    session_id: str
    type: str
    data: dict[str, Any]
    turn_id: str | None = None
    seq: int | None = None
    ts: str = field(default_factory=now_iso)
    id: str | None = None

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    def frame(self) -> dict[str, Any]:
        """The frame as clients see it, key order fixed for readability."""
        return {"id": self.id, "session_id": self.session_id, "turn_id": self.turn_id,
                "seq": self.seq, "type": self.type, "ts": self.ts, "data": self.data}

    def to_json(self) -> str:
        return json.dumps(self.frame(), separators=(",", ":"))

    def to_fields(self) -> dict[str, str]:
        """The Redis stream entry: the frame minus its id, which Redis assigns."""
        return {"e": json.dumps({"session_id": self.session_id, "turn_id": self.turn_id,
                                 "seq": self.seq, "type": self.type, "ts": self.ts,
                                 "data": self.data}, separators=(",", ":"))}

    @classmethod
    def decode(cls, stream_id: str | bytes, fields: dict) -> "Event":
        """Rebuilds an event from a stream entry; EnvelopeError when it is not one."""
        raw = fields.get("e", fields.get(b"e"))
        if raw is None:
            raise EnvelopeError("stream entry has no envelope field")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise EnvelopeError(f"envelope is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise EnvelopeError("envelope is not an object")
        missing = {"session_id", "type", "ts", "data"} - body.keys()
        if missing:
            raise EnvelopeError(f"envelope lacks {sorted(missing)}")
        if not is_valid_type(body["type"]) or not isinstance(body["data"], dict):
            raise EnvelopeError(f"bad envelope type or data: {body['type']!r}")
        sid = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return cls(id=sid, session_id=body["session_id"], turn_id=body.get("turn_id"),
                   seq=body.get("seq"), type=body["type"], ts=body["ts"], data=body["data"])


def status_event(session_id: str, status: str, error: str | None = None, reason: str | None = None) -> Event:
    """The `session.status` event for a session entering `status` (with why, when it is not obvious)."""
    data = {"status": status}
    if error is not None:
        data["error"] = error
    if reason is not None:
        data["reason"] = reason
    return Event(session_id=session_id, type="session.status", data=data)
