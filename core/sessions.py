"""Session commands: create, find, list, stop and delete requests. Callers commit."""
from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from core import workspaces
from core.errors import NotFound, WrongState
from core.models import Session, Turn
from core.turn_ends import end_turns
from core.turn_states import Ending, TurnReason, TurnStatus

# States in which a session accepts new turns (a stopped one restarts on its next turn).
CHAT_STATES = ("creating", "ready", "busy", "stopped")


def parse_uuid(value: str, what: str) -> uuid.UUID:
    """A UUID from a path segment; an unknown id and a malformed one are both 404."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFound(f"no {what} with id {value!r}") from None


def create_session(db: DbSession, owner: str, config: dict, workspace: dict,
                   parent_id: uuid.UUID | None = None, depth: int = 0,
                   root_id: uuid.UUID | None = None) -> Session:
    """A new session row in `creating`; its container is made by the start task."""
    session_id = uuid.uuid4()
    row = Session(id=session_id, owner=owner, config=config, workspace=workspace, parent_id=parent_id,
                  depth=depth, root_id=root_id or session_id, status="creating", claude_session_id=uuid.uuid4())
    db.add(row)
    db.flush()
    return row


def start_spec(row) -> dict:
    """What a worker needs to make a session's container (from a Session, or a row with those columns); the
    request that makes the session sends it with the start task, so the worker need not read it first."""
    return {"owner": row.owner, "config": dict(row.config), "persistent": workspaces.is_persistent(row.workspace)}


def get_owned(db: DbSession, owner: str, session_id: str, *, lock: bool = False) -> Session:
    """The caller's session; another owner's session is reported as missing, never as forbidden."""
    query = select(Session).where(Session.id == parse_uuid(session_id, "session"), Session.owner == owner)
    if lock:
        query = query.with_for_update()
    row = db.scalars(query).first()
    if row is None:
        raise NotFound(f"no session with id {session_id}")
    return row


def list_owned(db: DbSession, owner: str, status: str | None, limit: int, offset: int
               ) -> tuple[list[Session], int]:
    """One page of the caller's sessions, newest first, and the total that match."""
    where = [Session.owner == owner]
    where.append(Session.status == status if status else Session.status != "deleted")
    total = db.scalar(select(func.count()).select_from(Session).where(*where))
    rows = db.scalars(select(Session).where(*where)
                      .order_by(Session.created_at.desc(), Session.id).limit(limit).offset(offset)).all()
    return list(rows), total or 0


def cancel_queued_turns(db: DbSession, session_id: uuid.UUID, why: str) -> list[Turn]:
    """Ends the session's queued turns `cancelled` (reason `cancelled`, error `why`); returns them for their
    events."""
    return end_turns(db, Ending(TurnStatus.CANCELLED, why, TurnReason.CANCELLED),
                     Turn.session_id == session_id, Turn.status == TurnStatus.QUEUED)


def request_stop(db: DbSession, row: Session) -> list[Turn]:
    """Moves a session to `stopping` and cancels its queued turns; the worker stops the container."""
    if row.status in ("deleted",):
        raise WrongState(f"session {row.id} is deleted")
    if row.status == "stopped":
        return []
    row.status = "stopping"
    return cancel_queued_turns(db, row.id, "session stopped")


def request_delete(db: DbSession, row: Session) -> list[Turn]:
    """Moves a session to `stopping` on its way to `deleted`; the worker removes everything."""
    if row.status == "deleted":
        raise WrongState(f"session {row.id} is already deleted")
    row.status = "stopping"
    row.error = None
    return cancel_queued_turns(db, row.id, "session deleted")
