"""Ends turns: the one place that records a turn's final status, error and reason, clears its lease, cancels the
approvals it still waits for, and makes its final event. The worker, the reaper, cancel, stop, delete and batches
all end turns here."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session as DbSession

from core.claimed import ClaimedTurn
from core.envelope import Event
from core.models import Approval, Turn, utcnow
from core.turn_states import UNFINISHED_TURN_STATUSES, Ending, TurnStatus

TURNS, APPROVALS = Turn.__table__, Approval.__table__
# An approval still waiting for its answer, and what it becomes when its turn ends first (core.approvals' statuses).
APPROVAL_PENDING, APPROVAL_CANCELLED = "pending", "cancelled"


def ending_columns(ending: Ending, now: datetime) -> dict:
    """What every ending writes: the outcome, when, and no lease any more."""
    return {"status": ending.status, "error": ending.error, "reason": ending.reason, "finished_at": now,
            "lease_holder": None, "lease_expires_at": None}


def end_turn(db: DbSession, turn: Turn | ClaimedTurn, ending: Ending, **values) -> Event | None:
    """Ends one turn and returns its final event (status, error, reason); `values` are more columns to set with
    it (the worker's result, usage and event ids).

    A `Turn` row is one the caller holds (under its session's row lock, or its own), so it is set as it stands.
    A `ClaimedTurn` is the worker's: it is ended only while it still runs under that claim's attempt (one UPDATE,
    fenced), and None says it is not ours any more: a later attempt, the reaper or a cancel got there first.
    """
    now = utcnow()
    columns = {**ending_columns(ending, now), **values}
    if isinstance(turn, Turn):
        for name, value in columns.items():
            setattr(turn, name, value)
        turn_id, session_id = turn.id, turn.session_id
    else:
        t, turn_id, session_id = TURNS.c, uuid.UUID(turn.id), turn.session_id
        done = db.execute(update(TURNS).where(t.id == turn_id, t.attempt == turn.attempt,
                                              t.status == TurnStatus.RUNNING).values(**columns))
        if done.rowcount != 1:
            return None
    cancel_pending_approvals(db, [turn_id], now)
    return Event(session_id=str(session_id), turn_id=str(turn_id), seq=turn.seq, type=ending.event_type,
                 data=ending.event_data())


def end_turns(db: DbSession, ending: Ending, *where) -> list[Turn]:
    """Ends every unfinished turn that matches `where` alike (a session's queued turns when it is stopped or
    deleted) in one statement; returns them, for their `ended_event`s, webhooks and batches."""
    now = utcnow()
    rows = list(db.scalars(update(Turn).where(Turn.status.in_(UNFINISHED_TURN_STATUSES), *where)
                           .values(**ending_columns(ending, now)).returning(Turn)).all())
    cancel_pending_approvals(db, [row.id for row in rows], now)
    return rows


def ended_event(turn: Turn) -> Event:
    """The final event of a turn ended here, from its row."""
    ending = Ending(TurnStatus(turn.status), turn.error, turn.reason)
    return Event(session_id=str(turn.session_id), turn_id=str(turn.id), seq=turn.seq, type=ending.event_type,
                 data=ending.event_data())


def cancel_pending_approvals(db: DbSession, turn_ids: list[uuid.UUID], now: datetime) -> int:
    """The turns' approvals nobody answered are `cancelled`: the turn ended first (Claude Code waits no more)."""
    if not turn_ids:
        return 0
    a = APPROVALS.c
    done = db.execute(update(APPROVALS).where(a.turn_id.in_(turn_ids), a.status == APPROVAL_PENDING)
                      .values(status=APPROVAL_CANCELLED, resolved_at=now, decision={"via": "turn_ended"}))
    return done.rowcount
