"""The reaper: hands turns whose worker vanished to a worker that re-attaches (or ends them,
`worker_lost`, when none does), re-sends lost tasks, has each host check its containers, moves
batches on, and forgets idempotency keys past their time."""
from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from core import batches, idempotency
from core.db import transaction
from core.envelope import Event
from core.models import Session, utcnow
from core.turn_ends import end_turn
from core.turn_states import Ending, TurnReason, TurnStatus
from core.turns import expired_leases, stale_queued_turns
from workers.context import WorkerContext

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(seconds=60)


def reap(ctx: WorkerContext, stale_after: timedelta = STALE_AFTER) -> dict[str, int]:
    """One sweep; returns how many turns it ended, handed to a worker to re-attach, and re-sent."""
    now = utcnow()
    lost_before = now - timedelta(seconds=ctx.settings.worker_lost_seconds)
    ended: list[Event] = []
    webhooks: list[str] = []
    reattach: list[tuple[str, str]] = []
    lost = 0
    with transaction(ctx.db) as db:
        for turn in expired_leases(db, now):
            session = db.get(Session, turn.session_id, with_for_update=True)
            if turn.lease_expires_at >= lost_before and session.host_queue:
                # Its worker stopped renewing; the turn's process may still run in its container.
                # Any worker of that host takes it over and re-attaches through the turn log.
                reattach.append((str(turn.id), session.host_queue))
                continue
            # Fence off the lost worker, in case it is only slow: it can publish nothing more.
            turn.attempt += 1
            mark = ctx.events.take_mark(str(turn.id), turn.attempt)
            event = end_turn(db, turn, Ending(
                TurnStatus.FAILED, f"the worker running this turn ({turn.lease_holder}) was lost and no worker of "
                                   f"its host took the turn over within {ctx.settings.worker_lost_seconds}s",
                TurnReason.WORKER_LOST))
            lost += 1
            if session.status == "busy":
                session.status = "ready"
            if mark.get("final"):  # it got as far as publishing its final event, not as recording it
                turn.last_event_id = mark["final"]
            else:
                ended.append(event)
            if turn.webhook:
                webhooks.append(str(turn.id))
        cutoff = now - stale_after
        stale = [(str(t.id), s.host_queue) for t, s in stale_queued_turns(db, cutoff)]
        # A session still `creating` long after it was made: its start task never arrived.
        unstarted = [str(i) for i in db.scalars(select(Session.id).where(
            Session.status == "creating", Session.created_at < cutoff))]
        hosts = list(db.scalars(select(Session.host_queue).where(
            Session.host_queue.is_not(None), Session.status != "deleted").distinct()))
        idempotency.purge(db, now - timedelta(seconds=ctx.settings.idempotency_ttl_seconds))
    if ended:
        ctx.events.publish_many(ended)
    # Pipelined: after a broker outage thousands may be waiting, and one round trip each would hold the sweep up.
    ctx.sender.run_turns(stale + reattach)
    ctx.sender.start_sessions(unstarted)
    for host_queue in hosts:
        ctx.sender.check_containers(host_queue)
    for turn_id in webhooks:
        ctx.sender.deliver_webhook("turn", turn_id)
    batches.advance(ctx.db, ctx.events, ctx.sender, ctx.cancels, ctx.settings)
    resent = len(stale) + len(unstarted)
    if lost or resent or reattach:
        log.info("reaper: %d turns lost their worker, %d handed over to re-attach, %d tasks re-sent",
                 lost, len(reattach), resent)
    return {"ended": lost, "reattach": len(reattach), "resent": resent}
