"""Named persistent workspaces: who holds one, where its snapshot lives, and what a new holder takes over."""
from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session as DbSession

from core.errors import WrongState
from core.models import Session, Workspace, utcnow

# A holder in one of these states keeps the workspace from anyone else.
HOLDING_STATES = ("creating", "ready", "busy", "stopping")


def is_persistent(workspace: dict | None) -> bool:
    return bool(workspace) and workspace.get("type") == "persistent"


def snapshot_key(owner: str, name: str) -> str:
    """The object key of a workspace's snapshot; the owner is hashed so any name is a safe key."""
    return f"workspaces/{hashlib.sha256(owner.encode()).hexdigest()[:24]}/{name}/snapshot.tar.gz"


def locked(db: DbSession, owner: str, name: str) -> Workspace:
    """The workspace row, made when missing, locked for this transaction."""
    db.execute(insert(Workspace).values(owner=owner, name=name, generation=0, conversation_started=False,
                                        created_at=utcnow()).on_conflict_do_nothing())
    return db.scalars(select(Workspace).where(Workspace.owner == owner, Workspace.name == name)
                      .with_for_update()).one()


def hold(db: DbSession, session: Session) -> Workspace | None:
    """Makes `session` the holder of its persistent workspace; 409 while another live session holds it.

    A session that takes over a newer snapshot than its volumes hold also takes over the
    snapshot's conversation, so its next turn resumes it.
    """
    if not is_persistent(session.workspace):
        return None
    name = session.workspace["name"]
    row = locked(db, session.owner, name)
    if row.holder_id is not None and row.holder_id != session.id:
        holder = db.get(Session, row.holder_id)
        if holder is not None and holder.status in HOLDING_STATES:
            raise WrongState(f"workspace {name!r} is held by running session {holder.id}; stop it first",
                             code="workspace_in_use")
    row.holder_id = session.id
    if row.claude_session_id is not None and row.generation != session.workspace.get("generation", 0):
        session.claude_session_id = row.claude_session_id
        session.conversation_started = row.conversation_started
    return row


def release(db: DbSession, session: Session) -> None:
    """Lets go of the session's workspace, if it holds it."""
    if not is_persistent(session.workspace):
        return
    row = locked(db, session.owner, session.workspace["name"])
    if row.holder_id == session.id:
        row.holder_id = None


def record_snapshot(db: DbSession, session: Session, key: str, size: int, sha256: str) -> int:
    """Records a saved snapshot as the workspace's newest generation; returns that generation."""
    row = locked(db, session.owner, session.workspace["name"])
    row.generation += 1
    row.snapshot_key, row.size_bytes, row.sha256, row.saved_at = key, size, sha256, utcnow()
    row.claude_session_id = session.claude_session_id
    row.conversation_started = session.conversation_started
    session.workspace = {**session.workspace, "generation": row.generation}
    return row.generation


def get(db: DbSession, owner: str, name: str) -> Workspace | None:
    return db.get(Workspace, (owner, name))
