"""Settles this host's session containers against the sessions table, after crashes and restarts:
removes containers no live session owns, marks ready sessions whose container is gone, and has the warm pool
clear out its dead containers (an untaken pool container is no session's, so it is never removed here)."""
from __future__ import annotations

import logging
import uuid

import docker.errors
from sqlalchemy import select

from core.db import transaction
from core.envelope import status_event
from core.models import Session, utcnow
from workers.context import WorkerContext
from workers.pool import WarmPool

log = logging.getLogger(__name__)

# Sessions in these states own their container; any other container of ours is left over.
LIVE_STATES = ("creating", "ready", "busy", "stopping", "stopped")


def check(ctx: WorkerContext) -> dict[str, int]:
    """One pass over this host; returns how many containers it removed and sessions it marked."""
    present = ctx.runtime.session_containers()
    with transaction(ctx.db) as db:
        known = {str(sid): status for sid, status in db.execute(
            select(Session.id, Session.status).where(Session.id.in_([uuid.UUID(s) for s in present])))}
        ready_here = [str(sid) for sid in db.scalars(select(Session.id).where(
            Session.host_queue == ctx.settings.host_queue(), Session.status == "ready"))]
    removed = 0
    for session_id in present:
        if known.get(session_id) not in LIVE_STATES:
            log.info("removing container of session %s (%s)", session_id, known.get(session_id, "no such session"))
            try:
                # Whatever its name (it may not be one we gave), with the volumes it mounts (a taken pool
                # container's are named after the pool, not the session); then what is named after the session.
                ctx.runtime.remove_container(present[session_id])
                ctx.runtime.remove(session_id)
                removed += 1
            except docker.errors.APIError as exc:  # e.g. a concurrent check removed it first
                log.warning("could not remove the container of session %s: %s", session_id, exc)
    marked = sum(1 for session_id in ready_here
                 if session_id not in present or present[session_id].status != "running"
                 if mark_lost(ctx, session_id))
    if removed or marked:
        log.info("container check: removed %d left-over containers, marked %d sessions whose container was gone",
                 removed, marked)
    return {"removed": removed, "marked": marked, "pool_removed": check_pool(ctx)}


def check_pool(ctx: WorkerContext) -> int:
    """Has the warm pool drop dead containers (an engine restart stops them all), and asks for a fill when it is
    short; returns how many it removed."""
    if not ctx.settings.warm_pool_size:
        return 0
    pool = WarmPool.of(ctx)
    try:
        removed = pool.prune()
    except docker.errors.DockerException as exc:  # e.g. the image is gone: the next fill says so, loudly
        log.warning("container check: could not check the warm pool: %s", exc)
        return 0
    if pool.ready() < pool.size:
        ctx.sender.fill_pool(ctx.settings.host_queue())
    return removed


def mark_lost(ctx: WorkerContext, session_id: str) -> bool:
    """A ready session whose container stopped or vanished (engine restart, host trouble) becomes
    `stopped`, so its next turn starts the container again (and restores a persistent workspace)."""
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        if row is None or row.status != "ready" or ctx.runtime.is_running(session_id):
            return False  # it moved on (a turn woke it) while we looked
        row.status, row.updated_at = "stopped", utcnow()
        # Under the row lock, so a wake that follows cannot publish its "starting" before this.
        ctx.events.publish(status_event(session_id, "stopped", reason="container_lost"))
    log.warning("session %s: its container is gone or stopped; marked stopped, the next turn starts it", session_id)
    return True
