"""Turn commands: submit, find, list, and the lease a worker holds while it runs one."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session as DbSession, selectinload

from core import trees, workspaces
from core.claimed import ClaimedSession, ClaimedTurn
from core.envelope import Event
from core.errors import NotFound, WrongState
from core.models import Session, Turn, utcnow
from core.sessions import CHAT_STATES, parse_uuid
from core.turn_ends import end_turn
from core.turn_states import CANCELLED_BY_REQUEST, FINISHED_TURN_STATUSES, TurnReason, TurnStatus

QUEUED, RUNNING = TurnStatus.QUEUED, TurnStatus.RUNNING


# Statements on every turn's path (the chat's count, the worker's claim and record) use the tables, not the mapped
# classes: an ORM-enabled UPDATE costs several times the CPU of the plain one (it reconciles the identity map).
TURNS, SESSIONS = Turn.__table__, Session.__table__
OTHER = TURNS.alias("other")  # another turn of the same session
# What a worker needs to run a turn.
TURN_COLUMNS = (TURNS.c.id, TURNS.c.session_id, TURNS.c.seq, TURNS.c.prompt, TURNS.c.attempt, TURNS.c.webhook,
                TURNS.c.batch_id, TURNS.c.process_id)
SESSION_COLUMNS = (SESSIONS.c.id, SESSIONS.c.owner, SESSIONS.c.config, SESSIONS.c.claude_session_id,
                   SESSIONS.c.conversation_started, SESSIONS.c.host_queue, SESSIONS.c.approval_rules,
                   SESSIONS.c.process_id)


def submit_turn(db: DbSession, session: Session, prompt: str) -> Turn:
    """Queues a prompt; `session` must be locked so seq stays gap-free and ordered."""
    if session.status not in CHAT_STATES:
        raise WrongState(f"session {session.id} is {session.status}; it takes no new turns")
    trees.check_budget(db, session)
    if session.status == "stopped":  # it restarts for this turn, so it must hold its workspace again
        workspaces.hold(db, session)
    session.turn_count += 1
    session.last_active_at = utcnow()
    turn = Turn(id=uuid.uuid4(), session_id=session.id, seq=session.turn_count, prompt=prompt,
                status=QUEUED)
    db.add(turn)
    db.flush()
    return turn


def queue_turn(db: DbSession, session: Session, prompt: str, *, webhook: str | None = None,
               batch_id: uuid.UUID | None = None) -> Turn:
    """A new queued turn on a locked session; the caller publishes its `queued_event`."""
    turn = submit_turn(db, session, prompt)
    turn.webhook, turn.batch_id = webhook, batch_id
    turn.webhook_status = "pending" if webhook else None
    return turn


def queued_event(turn: Turn) -> Event:
    return Event(session_id=str(turn.session_id), turn_id=str(turn.id), seq=turn.seq,
                 type="turn.queued", data={"status": QUEUED})


def request_cancel(db: DbSession, turn: Turn) -> Event | None:
    """Cancels a queued turn at once (its final event, to publish), or marks a running one for its worker to stop
    (None).

    The caller holds the session lock, so no worker claims the turn in between.
    """
    if turn.status in FINISHED_TURN_STATUSES:
        raise WrongState(f"turn {turn.id} already ended ({turn.status}); there is nothing to cancel",
                         code="turn_finished")
    if turn.status == QUEUED:
        return end_turn(db, turn, CANCELLED_BY_REQUEST)
    if turn.cancel_requested_at is None:
        turn.cancel_requested_at = utcnow()
    return None


def cancel_running_turns(db: DbSession, session_id: uuid.UUID, reason: TurnReason | None = None,
                         error: str | None = None) -> list[str]:
    """Marks the session's running turn(s) for cancellation; returns their ids to signal. With a `reason` (the
    service stopped the session, e.g. disk_quota), the turn ends `failed` with that reason and `error` instead of
    `cancelled` (see TurnRunner)."""
    why = {"reason": reason, "error": error} if reason else {}
    rows = db.execute(update(Turn).where(Turn.session_id == session_id, Turn.status == RUNNING,
                                         Turn.cancel_requested_at.is_(None))
                      .values(cancel_requested_at=func.now(), **why).returning(Turn.id)).scalars().all()
    return [str(i) for i in rows]


def queue_positions(db: DbSession, session_ids: set[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Each queued turn's place in its session's queue: 1 runs next (after any running turn)."""
    if not session_ids:
        return {}
    place = func.row_number().over(partition_by=Turn.session_id, order_by=Turn.seq)
    rows = db.execute(select(Turn.id, place).where(Turn.session_id.in_(session_ids), Turn.status == QUEUED))
    return {turn_id: position for turn_id, position in rows}


def turns_in_flight(db: DbSession, session_id: uuid.UUID) -> tuple[int, int]:
    """How many of the session's turns are queued, and how many running (one statement)."""
    t = TURNS.c
    queued, running = db.execute(select(func.count().filter(t.status == QUEUED),
                                        func.count().filter(t.status == RUNNING))
                                 .where(t.session_id == session_id, t.status.in_((QUEUED, RUNNING)))).one()
    return queued, running


def first_turn(db: DbSession, session_id: uuid.UUID) -> Turn | None:
    return db.scalars(select(Turn).where(Turn.session_id == session_id).order_by(Turn.seq).limit(1)).first()


def latest_turn(db: DbSession, session_id: uuid.UUID) -> Turn | None:
    return db.scalars(select(Turn).where(Turn.session_id == session_id)
                      .order_by(Turn.seq.desc()).limit(1)).first()


def list_turns(db: DbSession, session_id: uuid.UUID, limit: int, offset: int) -> tuple[list[Turn], int]:
    """One page of a session's turns in seq order, and how many there are."""
    total = db.scalar(select(func.count()).select_from(Turn).where(Turn.session_id == session_id))
    # The page's pending approvals in one query, not one per turn body.
    rows = db.scalars(select(Turn).where(Turn.session_id == session_id).options(selectinload(Turn.pending_approvals))
                      .order_by(Turn.seq).limit(limit).offset(offset)).all()
    return list(rows), total or 0


def get_owned_turn(db: DbSession, owner: str, turn_id: str) -> Turn:
    """A turn of one of the caller's sessions; anyone else's is missing."""
    row = db.scalars(select(Turn).join(Session, Session.id == Turn.session_id)
                     .where(Turn.id == parse_uuid(turn_id, "turn"), Session.owner == owner)).first()
    if row is None:
        raise NotFound(f"no turn with id {turn_id}")
    return row


def next_turn_id(db: DbSession, session_id: uuid.UUID) -> uuid.UUID | None:
    """The session's next turn to run: its first queued one, if none is running (one statement)."""
    running = select(OTHER.c.id).where(OTHER.c.session_id == session_id, OTHER.c.status == RUNNING)
    return db.scalar(select(TURNS.c.id).where(TURNS.c.session_id == session_id, TURNS.c.status == QUEUED,
                                              ~running.exists()).order_by(TURNS.c.seq).limit(1))


def claim_turn(db: DbSession, turn_id: str, holder: str, lease_seconds: float
               ) -> tuple[ClaimedTurn, ClaimedSession] | None:
    """Takes the lease on a turn: (turn, session), or None when it is not ours to run.

    A queued turn is taken if it is its session's next one (the session row lock serialises
    claims, so two deliveries of one task, or two turns of one session, never run at once).
    A running turn whose lease expired is taken over, to re-attach to it: the turn's `resumed` says so.
    Each claim bumps `attempt`, which fences off the previous holder.
    """
    turn_uuid, t = uuid.UUID(turn_id), TURNS.c
    of_turn = select(t.session_id).where(t.id == turn_uuid).scalar_subquery()
    session = db.execute(select(*SESSION_COLUMNS).where(SESSIONS.c.id == of_turn).with_for_update()).mappings().first()
    if session is None:
        return None
    now = utcnow()
    lease = dict(attempt=t.attempt + 1, lease_holder=holder, lease_expires_at=now + timedelta(seconds=lease_seconds))
    ahead = select(OTHER.c.id).where(OTHER.c.session_id == t.session_id, OTHER.c.id != t.id,
                                     or_(OTHER.c.status == RUNNING,
                                         and_(OTHER.c.status == QUEUED, OTHER.c.seq < t.seq)))
    turn = db.execute(update(TURNS).where(t.id == turn_uuid, t.status == QUEUED, ~ahead.exists())
                      # The process a new Claude Code would be for this turn (its model credential names it).
                      .values(status=RUNNING, started_at=now, process_id=uuid.uuid4(), **lease)
                      .returning(*TURN_COLUMNS)).mappings().first()
    resumed = turn is None
    if resumed:
        turn = db.execute(update(TURNS).where(t.id == turn_uuid, t.status == RUNNING, t.lease_expires_at < now)
                          .values(**lease).returning(*TURN_COLUMNS)).mappings().first()
        if turn is None:
            return None
    s = SESSIONS.c
    db.execute(update(SESSIONS).where(s.id == session["id"]).values(
        last_active_at=now, status=case((s.status.in_(("ready", "stopped", "creating")), "busy"), else_=s.status)))
    return ClaimedTurn.from_row(turn, resumed), ClaimedSession.from_row(session)


def renew_lease(db: DbSession, turn_id: uuid.UUID, attempt: int, lease_seconds: float) -> bool:
    """Extends our lease; False when the turn is no longer ours (fenced by attempt)."""
    t = TURNS.c
    done = db.execute(update(TURNS).where(t.id == turn_id, t.attempt == attempt, t.status == RUNNING)
                      .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
    return done.rowcount == 1


def expired_leases(db: DbSession, now: datetime) -> list[Turn]:
    return list(db.scalars(select(Turn).where(Turn.status == RUNNING, Turn.lease_expires_at < now)
                           .with_for_update(skip_locked=True)).all())


def stale_queued_turns(db: DbSession, older_than: datetime) -> list[tuple[Turn, Session]]:
    """Session heads queued for a while with nothing running: their task may have been lost."""
    rows = db.execute(select(Turn, Session).join(Session, Session.id == Turn.session_id)
                      .where(Turn.status == QUEUED, Turn.created_at < older_than,
                             Session.host_queue.is_not(None),
                             Session.status.in_(("ready", "busy", "stopped")))
                      .order_by(Turn.session_id, Turn.seq)).all()
    heads: dict[uuid.UUID, tuple[Turn, Session]] = {}
    for turn, session in rows:
        heads.setdefault(turn.session_id, (turn, session))
    return list(heads.values())

