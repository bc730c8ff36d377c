"""Spawn trees: children made by a session, the subtree a session-scoped token may touch, the tree budget."""
from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from core.errors import DomainError, WrongState
from core.models import Session
from core.sessions import CHAT_STATES, create_session
from core.settings import Settings

ENDED_STATES = ("stopping", "stopped", "failed", "deleted")


class BudgetExhausted(DomainError):
    status = 402
    code = "budget_exhausted"


def spawn_child(db: DbSession, parent: Session, settings: Settings, config: dict, workspace: dict) -> Session:
    """A child session of a locked parent, one level deeper; refused past the depth or child limit."""
    if parent.status not in CHAT_STATES:
        raise WrongState(f"session {parent.id} is {parent.status}; only a live session can spawn children")
    depth = parent.depth + 1
    if depth > settings.max_spawn_depth:
        raise WrongState(f"session {parent.id} is at depth {parent.depth}; MAX_SPAWN_DEPTH is "
                         f"{settings.max_spawn_depth}, so it cannot spawn a child", code="spawn_depth_exceeded")
    children = db.scalar(select(func.count()).select_from(Session)
                         .where(Session.parent_id == parent.id, Session.status != "deleted")) or 0
    if children >= settings.max_children:
        raise WrongState(f"session {parent.id} already has {children} children (CCD_MAX_CHILDREN); "
                         "stop or delete one first", code="too_many_children")
    return create_session(db, parent.owner, config, workspace, parent_id=parent.id, depth=depth,
                          root_id=parent.root_id or parent.id)


def child_config(parent_config: dict, overrides: dict) -> dict:
    """The parent's config with the request's keys on top; the tree budget stays on the root."""
    merged = {**parent_config, **overrides}
    merged.pop("max_budget_usd", None)
    return merged


def children(db: DbSession, session_id: uuid.UUID) -> list[Session]:
    return list(db.scalars(select(Session).where(Session.parent_id == session_id, Session.status != "deleted")
                           .order_by(Session.created_at, Session.id)))


def descendants(db: DbSession, session_id: uuid.UUID) -> list[Session]:
    """Every session below this one, parents before their children."""
    tree = select(Session.id, Session.depth).where(Session.parent_id == session_id).cte(recursive=True)
    tree = tree.union_all(select(Session.id, Session.depth).join(tree, Session.parent_id == tree.c.id))
    ids = select(tree.c.id)
    return list(db.scalars(select(Session).where(Session.id.in_(ids))
                           .order_by(Session.depth, Session.created_at, Session.id)))


def in_subtree(db: DbSession, top: uuid.UUID, session_id: uuid.UUID) -> bool:
    """True when `session_id` is `top` or below it (walks up the parents; trees are shallow)."""
    current: uuid.UUID | None = session_id
    for _ in range(64):
        if current is None:
            return False
        if current == top:
            return True
        current = db.scalar(select(Session.parent_id).where(Session.id == current))
    return False


def tree_cost(db: DbSession, root_id: uuid.UUID) -> Decimal:
    return db.scalar(select(func.coalesce(func.sum(Session.cost_usd), 0)).where(Session.root_id == root_id))


def check_budget(db: DbSession, session: Session) -> None:
    """Refuses a new turn anywhere in a tree whose root's max_budget_usd is spent."""
    root = session if session.root_id in (None, session.id) else db.get(Session, session.root_id)
    budget = (root.config or {}).get("max_budget_usd") if root is not None else None
    if budget is None:
        return
    spent = tree_cost(db, root.id)
    if spent >= Decimal(str(budget)):
        raise BudgetExhausted(f"the session tree of {root.id} has spent ${spent:.4f} of its "
                              f"max_budget_usd ${budget}; no new turns run in it")
