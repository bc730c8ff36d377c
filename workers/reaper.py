"""The reaper: ends turns whose worker vanished, re-sends lost tasks, moves batches on,
and forgets idempotency keys past their time."""
from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from core import batches, idempotency
from core.db import transaction
from core.envelope import Event
from core.models import Session, utcnow
from core.turns import ended_event, expired_leases, stale_queued_turns
from workers.context import WorkerContext

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(seconds=60)


def reap(ctx: WorkerContext, stale_after: timedelta = STALE_AFTER) -> dict[str, int]:
    """One sweep; returns how many turns it ended and how many tasks it re-sent."""
    ended: list[Event] = []
    webhooks: list[str] = []
    with transaction(ctx.db) as db:
        for turn in expired_leases(db, utcnow()):
            error = f"the worker running this turn ({turn.lease_holder}) stopped renewing its lease"
            turn.status, turn.error, turn.finished_at = "failed", error, utcnow()
            turn.lease_holder = turn.lease_expires_at = None
            session = db.get(Session, turn.session_id, with_for_update=True)
            if session.status == "busy":
                session.status = "ready"
            ended.append(ended_event(turn))
            if turn.webhook:
                webhooks.append(str(turn.id))
        cutoff = utcnow() - stale_after
        stale = [(str(t.id), s.host_queue) for t, s in stale_queued_turns(db, cutoff)]
        # A session still `creating` long after it was made: its start task never arrived.
        unstarted = [str(i) for i in db.scalars(select(Session.id).where(
            Session.status == "creating", Session.created_at < cutoff))]
        idempotency.purge(db, utcnow() - timedelta(seconds=ctx.settings.idempotency_ttl_seconds))
    if ended:
        ctx.events.publish_many(ended)
    for turn_id, host_queue in stale:
        ctx.sender.run_turn(turn_id, host_queue)
    for session_id in unstarted:
        ctx.sender.start_session(session_id)
    for turn_id in webhooks:
        ctx.sender.deliver_webhook("turn", turn_id)
    batches.advance(ctx.db, ctx.events, ctx.sender, ctx.cancels, ctx.settings)
    resent = len(stale) + len(unstarted)
    if ended or resent:
        log.info("reaper: ended %d turns with expired leases, re-sent %d tasks", len(ended), resent)
    return {"ended": len(ended), "resent": resent}
