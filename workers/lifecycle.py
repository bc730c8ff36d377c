"""Session lifecycle on this host: start the container, stop it, delete everything."""
from __future__ import annotations

import logging
import uuid

from core.db import transaction
from core.envelope import status_event
from core.models import Session, utcnow
from core.turns import head_queued_turn
from workers.context import WorkerContext

log = logging.getLogger(__name__)


def _locked(db, session_id: str) -> Session | None:
    return db.get(Session, uuid.UUID(session_id), with_for_update=True)


def publish_status(ctx: WorkerContext, session_id: str, status: str, error: str | None = None) -> None:
    ctx.events.publish(status_event(session_id, status, error))


def start_session(ctx: WorkerContext, session_id: str) -> None:
    """Creates and starts the container here, pins the session to this host, starts its turns."""
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None or row.status != "creating":
            return  # already started, or stopped/deleted before we got here
        owner, config = row.owner, dict(row.config)
    try:
        container_id = ctx.runtime.ensure_running(session_id, owner, config)
    except Exception as exc:
        log.error("session %s: container failed to start: %s", session_id, exc)
        with transaction(ctx.db) as db:
            row = _locked(db, session_id)
            if row is not None and row.status == "creating":
                row.status, row.error = "failed", f"container failed to start: {exc}"
        publish_status(ctx, session_id, "failed", f"container failed to start: {exc}")
        return
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None or row.status != "creating":
            # Deleted or stopped while we started it: leave no container running behind it.
            if row is None or row.status == "deleted":
                ctx.runtime.remove(session_id)
            else:
                ctx.runtime.stop(session_id)
            return
        row.status, row.container_id = "ready", container_id
        row.host_queue = ctx.settings.host_queue()
        head = head_queued_turn(db, row.id)
    publish_status(ctx, session_id, "ready")
    log.info("session %s ready in container %s", session_id, container_id[:12])
    if head is not None:
        ctx.sender.run_turn(str(head.id), ctx.settings.host_queue())


def stop_session(ctx: WorkerContext, session_id: str) -> None:
    """Stops the container; volumes stay, so the next turn resumes where this one left off."""
    ctx.runtime.stop(session_id)
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None or row.status != "stopping":
            return
        row.status = "stopped"
        row.updated_at = utcnow()
    publish_status(ctx, session_id, "stopped")
    log.info("session %s stopped", session_id)


def delete_session(ctx: WorkerContext, session_id: str) -> None:
    """Removes the container, its volumes and its events, then marks the row deleted."""
    ctx.runtime.remove(session_id)
    ctx.events.delete(session_id)
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None:
            return
        row.status, row.container_id = "deleted", None
    log.info("session %s deleted", session_id)
