"""Admission control: per-owner limits on live sessions, running turns and queued turns."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from core.errors import DomainError
from core.models import Session, Turn
from core.settings import Settings

# Sessions that hold (or are about to hold) a container.
LIVE_SESSION_STATES = ("creating", "ready", "busy", "stopping")


class OverLimit(DomainError):
    """429: the owner is at a limit; retry after `retry_after` seconds."""

    status = 429
    code = "over_limit"

    def __init__(self, message: str, *, code: str, retry_after: int, limit: int) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.limit = limit


def live_sessions(db: DbSession, owner: str) -> int:
    return db.scalar(select(func.count()).select_from(Session)
                     .where(Session.owner == owner, Session.status.in_(LIVE_SESSION_STATES))) or 0


def turn_counts(db: DbSession, owner: str) -> dict[str, int]:
    """The owner's turns that are queued and running right now."""
    rows = db.execute(select(Turn.status, func.count()).join(Session, Session.id == Turn.session_id)
                      .where(Session.owner == owner, Turn.status.in_(("queued", "running")))
                      .group_by(Turn.status)).all()
    counts = {"queued": 0, "running": 0}
    counts.update({status: n for status, n in rows})
    return counts


def admit_session(db: DbSession, owner: str, settings: Settings) -> None:
    """Refuses a new session when the owner already has the most live sessions allowed."""
    limit = settings.owner_max_sessions
    if live_sessions(db, owner) >= limit:
        raise OverLimit(f"you have {limit} live sessions, the most allowed; stop or delete one, "
                        "or retry later", code="session_limit", retry_after=30, limit=limit)


def admit_turn(db: DbSession, owner: str, settings: Settings, session_idle: bool) -> None:
    """Refuses a turn that would run past the running-turn limit or wait past the queue limit.

    A turn for an idle session would start at once, so it counts against running turns;
    one for a busy session waits in its queue, so it counts against queued turns.
    """
    counts = turn_counts(db, owner)
    if session_idle and counts["running"] >= settings.owner_max_running_turns:
        limit = settings.owner_max_running_turns
        raise OverLimit(f"you have {counts['running']} turns running, the most allowed is {limit}; "
                        "retry when one finishes", code="running_turn_limit", retry_after=5, limit=limit)
    if not session_idle and counts["queued"] >= settings.owner_max_queued_turns:
        limit = settings.owner_max_queued_turns
        raise OverLimit(f"you have {counts['queued']} turns queued, the most allowed is {limit}; "
                        "retry when the queue drains", code="queued_turn_limit", retry_after=5, limit=limit)
