"""What a worker holds while it runs a turn: the claimed turn and its session, typed (see core.turns.claim_turn)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClaimedTurn:
    """A turn as its worker runs it. The reader thread, the publisher's thread and the lease watcher share it:
    each field below `resumed` is written by one of them and read by the others (single assignments)."""

    id: str
    seq: int
    attempt: int  # this claim's: it fences off every earlier holder
    session_id: str = ""
    prompt: str = ""
    webhook: str | None = None
    batch_id: uuid.UUID | None = None
    process_id: str | None = None  # the Claude Code process a new start would be (its credential names it)
    resumed: bool = False  # taken over from a lost worker, to re-attach
    lost: bool = False  # a later attempt owns the turn (or its final event is out): publish and record nothing
    next: str | None = None  # the session's next queued turn, found as this one was recorded
    approvals: Any = None  # the worker's view of its permission prompts (workers/approvals.py TurnApprovals)
    taken_at: float | None = None  # monotonic times, for the worker's metrics
    first_event_at: float | None = None

    @classmethod
    def from_row(cls, row: Any, resumed: bool) -> "ClaimedTurn":
        """From the claim's RETURNING row (core.turns.TURN_COLUMNS)."""
        return cls(id=str(row["id"]), seq=row["seq"], attempt=row["attempt"], session_id=str(row["session_id"]),
                   prompt=row["prompt"], webhook=row["webhook"], batch_id=row["batch_id"],
                   process_id=str(row["process_id"]) if row["process_id"] else None, resumed=resumed)


@dataclass
class ClaimedSession:
    """The session of a claimed turn, as read under its row lock when the turn was claimed."""

    id: str
    owner: str = ""
    config: dict = field(default_factory=dict)
    claude_session_id: str = ""
    conversation_started: bool = False
    host_queue: str | None = None
    approval_rules: list = field(default_factory=list)
    process_id: str | None = None  # the hot process the container last reported

    @classmethod
    def from_row(cls, row: Any) -> "ClaimedSession":
        """From the claim's session row (core.turns.SESSION_COLUMNS)."""
        return cls(id=str(row["id"]), owner=row["owner"], config=dict(row["config"] or {}),
                   claude_session_id=str(row["claude_session_id"]),
                   conversation_started=bool(row["conversation_started"]), host_queue=row["host_queue"],
                   approval_rules=list(row["approval_rules"] or []),
                   process_id=str(row["process_id"]) if row["process_id"] else None)
