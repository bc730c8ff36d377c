"""Admission control: per-owner limits on live sessions (their number, memory and CPUs), running turns,
queued turns and pending batch items."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from core.errors import DomainError
from core.limits import DEFAULT_LIMITS
from core.models import Batch, BatchItem, Session, Turn
from core.settings import Settings

# Sessions that hold (or are about to hold) a container.
LIVE_SESSION_STATES = ("creating", "ready", "busy", "stopping")


class OverLimit(DomainError):
    """429: the owner is at a limit; retry after `retry_after` seconds."""

    status = 429
    code = "over_limit"

    def __init__(self, message: str, *, code: str, retry_after: int, limit: int | float) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.limit = limit


def lock_owner(db: DbSession, owner: str, wait: bool = True) -> bool:
    """Serializes the owner's admissions until this transaction ends, so two requests at once cannot both take
    the last room. Taken before any session row lock (a release holds it while it locks sessions). Without
    `wait`, False when another transaction holds it."""
    key = func.hashtextextended("ccd.owner:" + owner, 0)
    if wait:
        db.execute(select(func.pg_advisory_xact_lock(key)))
        return True
    return bool(db.scalar(select(func.pg_try_advisory_xact_lock(key))))


def asked(config: dict) -> tuple[float, float]:
    """The memory (MB) and CPUs a session config holds while its session is live."""
    limits = {**DEFAULT_LIMITS, **(config.get("limits") or {})}
    return float(limits["memory_mb"]), float(limits["cpus"])


@dataclass
class Room:
    """What the owner's live sessions hold against the limits; `take` counts one more in."""

    settings: Settings
    sessions: int
    memory_mb: float
    cpus: float

    @classmethod
    def of(cls, db: DbSession, owner: str, settings: Settings) -> "Room":
        limits = Session.config["limits"]
        count, memory, cpus = db.execute(
            select(func.count(),
                   func.coalesce(func.sum(func.coalesce(limits["memory_mb"].as_float(), DEFAULT_LIMITS["memory_mb"])), 0),
                   func.coalesce(func.sum(func.coalesce(limits["cpus"].as_float(), DEFAULT_LIMITS["cpus"])), 0))
            .where(Session.owner == owner, Session.status.in_(LIVE_SESSION_STATES))).one()
        return cls(settings, count, float(memory), float(cpus))

    def refusal(self, config: dict) -> OverLimit | None:
        """Why one more live session with this config does not fit, or None."""
        s = self.settings
        memory, cpus = asked(config)
        if self.sessions >= s.owner_max_sessions:
            return OverLimit(f"you have {self.sessions} live sessions, the most allowed; stop or delete one, "
                             "or retry later", code="session_limit", retry_after=30, limit=s.owner_max_sessions)
        if self.memory_mb + memory > s.owner_memory_quota:
            return OverLimit(f"your live sessions hold {self.memory_mb:.0f} MB of memory; {memory:.0f} MB more "
                             f"would pass your quota of {s.owner_memory_quota} MB (CCD_OWNER_MAX_MEMORY_MB); stop "
                             "a session or ask for less", code="memory_quota", retry_after=30, limit=s.owner_memory_quota)
        if self.cpus + cpus > s.owner_cpu_quota + 1e-9:  # sums of floats: 0.1 + 0.2 must fit in 0.3
            return OverLimit(f"your live sessions hold {self.cpus:g} CPUs; {cpus:g} more would pass your quota "
                             f"of {s.owner_cpu_quota:g} (CCD_OWNER_MAX_CPUS); stop a session or ask for less",
                             code="cpu_quota", retry_after=30, limit=s.owner_cpu_quota)
        return None

    def take(self, config: dict) -> None:
        memory, cpus = asked(config)
        self.sessions, self.memory_mb, self.cpus = self.sessions + 1, self.memory_mb + memory, self.cpus + cpus


def turn_counts(db: DbSession, owner: str) -> dict[str, int]:
    """The owner's turns that are queued and running right now."""
    rows = db.execute(select(Turn.status, func.count()).join(Session, Session.id == Turn.session_id)
                      .where(Session.owner == owner, Turn.status.in_(("queued", "running")))
                      .group_by(Turn.status)).all()
    counts = {"queued": 0, "running": 0}
    counts.update({status: n for status, n in rows})
    return counts


def admit_session(db: DbSession, owner: str, settings: Settings, config: dict) -> None:
    """Refuses a session that would become live past the owner's session limit or memory or CPU quota."""
    lock_owner(db, owner)
    if refusal := Room.of(db, owner, settings).refusal(config):
        raise refusal


def admit_restart(db: DbSession, session: Session, settings: Settings) -> None:
    """A stopped session (locked) that a turn starts again must fit the owner's limits like a new one. Its row
    lock is held already, so the owner lock is only tried (waiting could deadlock with a batch release, which
    takes them the other way round); without it the count is checked all the same."""
    lock_owner(db, session.owner, wait=False)
    if refusal := Room.of(db, session.owner, settings).refusal(session.config or {}):
        raise refusal


def admit_pending_items(db: DbSession, owner: str, settings: Settings, new: int) -> None:
    """Refuses a batch whose items would take the owner's pending (not yet released) items past the limit."""
    lock_owner(db, owner)
    limit = settings.owner_max_pending_items
    pending = db.scalar(select(func.count()).select_from(BatchItem).join(Batch, Batch.id == BatchItem.batch_id)
                        .where(Batch.owner == owner, Batch.status == "running", BatchItem.status == "pending")) or 0
    if pending + new > limit:
        raise OverLimit(f"you have {pending} batch items pending and this batch adds {new}; at most {limit} may "
                        "wait (CCD_OWNER_MAX_PENDING_ITEMS): retry when your batches have moved on",
                        code="pending_items_limit", retry_after=30, limit=limit)


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
