"""Session lifecycle on this host: start the container, stop it, delete everything, stop idle ones."""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import func, select, update

from core import workspaces
from core.db import transaction
from core.envelope import status_event
from core.models import Session, Turn, utcnow
from core.sessions import request_stop, start_spec
from core.turns import SESSIONS, next_turn_id
from workers import snapshots
from workers.context import WorkerContext
from workers.pool import WarmPool, uses_pool

log = logging.getLogger(__name__)


def _locked(db, session_id: str) -> Session | None:
    return db.get(Session, uuid.UUID(session_id), with_for_update=True)


def publish_status(ctx: WorkerContext, session_id: str, status: str, error: str | None = None,
                   reason: str | None = None) -> None:
    ctx.events.publish(status_event(session_id, status, error, reason))


def start_session(ctx: WorkerContext, session_id: str, spec: dict | None = None) -> None:
    """Creates and starts the container here, restores its workspace, pins the session to this host,
    and starts its turns.

    `spec` is what to make ({"owner", "config", "persistent"}), sent with the task by the request that made the
    session: then the container is made at once, and whether the session is still to be made is checked after
    (see `_abandon`). Without it (a start re-sent by the reaper or a batch), it is read from the row first.
    """
    sid, c = uuid.UUID(session_id), SESSIONS.c
    if spec is None:
        spec = _creating(ctx, sid)
        if spec is None:
            return  # already started, or stopped/deleted before we got here
    owner, config = spec["owner"], spec["config"]
    try:
        container_id, how = start_container(ctx, session_id, owner, config)
        if spec["persistent"]:  # an ephemeral workspace has no snapshot: no need to ask
            if _creating(ctx, sid) is None:  # never over a workspace that is in use
                return _abandon(ctx, session_id, how)
            snapshots.restore(ctx, session_id, container_id, fresh=True)
    except Exception as exc:
        log.error("session %s: container failed to start: %s", session_id, exc)
        with transaction(ctx.db) as db:
            failed = _locked(db, session_id)
            if failed is None or failed.status != "creating":
                return  # a late copy of this task: the session's container is not this one's to stop
            failed.status, failed.error = "failed", f"container failed to start: {exc}"
            workspaces.release(db, failed)
        ctx.runtime.stop(session_id)
        reason = exc.code if isinstance(exc, snapshots.SnapshotTooLarge) else None
        publish_status(ctx, session_id, "failed", f"container failed to start: {exc}", reason)
        return
    with transaction(ctx.db) as db:
        ready = db.execute(update(SESSIONS).where(c.id == sid, c.status == "creating").values(
            status="ready", container_id=container_id, host_queue=ctx.settings.host_queue()).returning(c.id)).first()
        # A second statement, so that it sees a turn queued while the update above waited for the row's lock.
        head = next_turn_id(db, sid) if ready else None
    if not ready:
        return _abandon(ctx, session_id, how)
    publish_status(ctx, session_id, "ready")
    log.info("session %s ready in container %s (%s)", session_id, container_id[:12], how)
    if head is not None:
        ctx.sender.run_turn(str(head), ctx.settings.host_queue())
    if ctx.settings.warm_pool_size and uses_pool(config, ctx.settings):
        ctx.sender.fill_pool(ctx.settings.host_queue())  # replaces what was taken (or was missing), after ready


def _creating(ctx: WorkerContext, sid: uuid.UUID) -> dict | None:
    """What to make for a session still to be made (plain statements: this is on every cold start's path)."""
    c = SESSIONS.c
    with transaction(ctx.db) as db:
        row = db.execute(select(c.owner, c.config, c.workspace).where(c.id == sid, c.status == "creating")).first()
    return start_spec(row) if row is not None else None


def _abandon(ctx: WorkerContext, session_id: str, how: str) -> None:
    """The session stopped being made while its container started (deleted, stopped), or an earlier copy of this
    task made it ready: leaves nothing running that should not be, and never touches a ready session's container."""
    with transaction(ctx.db) as db:
        status = db.scalar(select(SESSIONS.c.status).where(SESSIONS.c.id == uuid.UUID(session_id)))
    if status in (None, "deleted"):
        ctx.runtime.remove(session_id)
    elif status not in ("ready", "busy"):
        ctx.runtime.stop(session_id)
    log.info("session %s is %s, not being made: this start (%s) was dropped", session_id, status or "gone", how)


def start_container(ctx: WorkerContext, session_id: str, owner: str, config: dict) -> tuple[str, str]:
    """The new session's container: a started one from this host's warm pool when its config matches the pool's
    ("taken"), else made the cold way (see DockerRuntime.ensure_running)."""
    ctx.runtime.require_firewall()  # a pool container is already started: check before it becomes a session's
    if ctx.settings.warm_pool_size and uses_pool(config, ctx.settings):
        if ctx.runtime.find(session_id) is not None:  # a retried start: keep the container it took, take no other
            return ctx.runtime.ensure_running(session_id, owner, config)
        container_id = WarmPool.of(ctx).take(session_id)
        if container_id is not None:
            return container_id, "taken"
    # Creating first: a retried start finds the container it made by the name conflict, in no extra engine call.
    return ctx.runtime.ensure_running(session_id, owner, config, new=True)


def wake(ctx: WorkerContext, session_id: str, owner: str, config: dict) -> str:
    """The session's running container; a stopped one is started (and its workspace restored) first,
    and the session's stream says so."""
    if not ctx.runtime.is_running(session_id):
        publish_status(ctx, session_id, "starting", reason="the container was stopped; starting it again")
    container_id, how = ctx.runtime.ensure_running(session_id, owner, config)
    if how != "running":
        snapshots.restore(ctx, session_id, container_id, fresh=how == "created")
    return container_id


def save_workspace(ctx: WorkerContext, session_id: str) -> tuple[str | None, str | None]:
    """Snapshots a persistent workspace; returns the error and its reason (`snapshot_too_large`) instead of
    raising, so a stop still completes."""
    try:
        snapshots.save(ctx, session_id)
        return None, None
    except Exception as exc:
        log.error("session %s: saving the workspace failed: %s", session_id, exc)
        reason = exc.code if isinstance(exc, snapshots.SnapshotTooLarge) else None
        return f"saving the workspace failed: {exc}; the volumes on {ctx.settings.host_name} still hold it", reason


def stop_session(ctx: WorkerContext, session_id: str, reason: str | None = None) -> None:
    """Stops the container and saves a persistent workspace; volumes stay, so the next turn resumes.
    With a `reason` (the service stopped it, e.g. disk_quota), the session keeps the error that says why."""
    ctx.runtime.stop(session_id)
    error, save_reason = save_workspace(ctx, session_id)
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None or row.status != "stopping":
            return
        why = row.error if reason else None
        row.status, row.error = "stopped", "; ".join(e for e in (why, error) if e) or None
        row.updated_at = utcnow()
        workspaces.release(db, row)
        error = row.error
    publish_status(ctx, session_id, "stopped", error, reason or save_reason)  # why it stopped comes first
    log.info("session %s stopped", session_id)


def delete_session(ctx: WorkerContext, session_id: str) -> None:
    """Saves a persistent workspace, removes the container, its volumes and its events, then marks
    the row deleted."""
    ctx.runtime.stop(session_id)
    save_workspace(ctx, session_id)
    ctx.runtime.remove(session_id)
    ctx.events.delete(session_id)
    with transaction(ctx.db) as db:
        row = _locked(db, session_id)
        if row is None:
            return
        row.status, row.container_id = "deleted", None
        workspaces.release(db, row)
    log.info("session %s deleted", session_id)


def stop_idle_sessions(ctx: WorkerContext) -> int:
    """Stops sessions that had no turn for their idle timeout (config.timeouts.idle_seconds, else
    CONTAINER_TIMEOUT_DEFAULT; never above CCD_MAX_IDLE_SECONDS); the next chat starts them again.
    Returns how many it stopped."""
    ceiling = ctx.settings.max_idle_seconds
    # as_float: a huge value in an old row cannot overflow the cast and stop the check for everyone
    idle_seconds = func.least(func.coalesce(Session.config["timeouts"]["idle_seconds"].as_float(),
                                            ctx.settings.container_timeout_default), ceiling)
    busy = select(Turn.id).where(Turn.session_id == Session.id, Turn.status.in_(("queued", "running")))
    stopped = []
    with transaction(ctx.db) as db:
        rows = db.scalars(select(Session).where(
            Session.status == "ready",
            Session.last_active_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, idle_seconds),
            ~busy.exists()).with_for_update(skip_locked=True)).all()
        for row in rows:
            request_stop(db, row)
            stopped.append((str(row.id), row.host_queue))
        ctx.events.publish_many([status_event(sid, "stopping", reason="idle") for sid, _ in stopped])
    for session_id, host_queue in stopped:
        ctx.sender.stop_session(session_id, host_queue)
    if stopped:
        log.info("stopped %d idle sessions", len(stopped))
    return len(stopped)
