"""Batches: many prompts taken in at once, released as turns at most `concurrency` at a time.

Items wait in Postgres as `pending`; `release` turns the next ones into queued turns when the
batch and the owner have room; `settle` copies a finished turn's status onto its item. Both
run from wherever a turn ends (worker, cancel, reaper), so a batch always moves on.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, case, func, insert, select, update
from sqlalchemy.orm import Session as DbSession

from core import sessions as session_cmds
from core import turns as turn_cmds
from core.admission import live_sessions, turn_counts
from core.cancels import CancelSignals
from core.db import transaction
from core.envelope import Event, status_event
from core.events import EventLog
from core.errors import NotFound, ValidationFailed, WrongState
from core.models import FINISHED_TURN_STATUSES, Batch, BatchItem, Session, Turn, utcnow
from core.sessions import CHAT_STATES, parse_uuid
from core.queues import TaskSender
from core.settings import Settings

INSERT_CHUNK = 1000


@dataclass
class Dispatch:
    """What a release or cancel decided, to do after its transaction commits."""

    events: list[Event] = field(default_factory=list)
    start_sessions: list[str] = field(default_factory=list)
    run_turns: list[tuple[str, str]] = field(default_factory=list)  # (turn id, host queue)
    stop_sessions: list[tuple[str, str | None]] = field(default_factory=list)
    signal_turns: list[str] = field(default_factory=list)
    finished_batches: list[str] = field(default_factory=list)


def check_sessions(db: DbSession, owner: str, items: list[dict]) -> None:
    """Every session an item names must be the owner's and take turns; names the first bad item."""
    wanted = {item["session_id"] for item in items if item.get("session_id")}
    if not wanted:
        return
    found = dict(db.execute(select(Session.id, Session.status)
                            .where(Session.id.in_(wanted), Session.owner == owner)).all())
    for index, item in enumerate(items):
        sid = item.get("session_id")
        if sid is None:
            continue
        if sid not in found:
            raise ValidationFailed(f"item {index}: no session with id {sid}", code="invalid_item",
                                   field=f"items[{index}].session_id")
        if found[sid] not in CHAT_STATES:
            raise ValidationFailed(f"item {index}: session {sid} is {found[sid]} and takes no turns",
                                   code="invalid_item", field=f"items[{index}].session_id")


def create_batch(db: DbSession, owner: str, items: list[dict], concurrency: int,
                 webhook: str | None) -> Batch:
    """The batch row and all its items as `pending`, inserted in chunks (one round trip each)."""
    batch = Batch(id=uuid.uuid4(), owner=owner, status="running", concurrency=concurrency,
                  total=len(items), webhook=webhook, webhook_status="pending" if webhook else None,
                  created_at=utcnow())
    db.add(batch)
    db.flush()
    rows = [{"batch_id": batch.id, "index": i, "custom_id": item.get("custom_id"), "prompt": item["prompt"],
             "session_id": item.get("session_id"), "config": item.get("config"), "status": "pending"}
            for i, item in enumerate(items)]
    for start in range(0, len(rows), INSERT_CHUNK):
        db.execute(insert(BatchItem), rows[start:start + INSERT_CHUNK])
    return batch


def get_owned(db: DbSession, owner: str, batch_id: str, *, lock: bool = False) -> Batch:
    query = select(Batch).where(Batch.id == parse_uuid(batch_id, "batch"), Batch.owner == owner)
    row = db.scalars(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"no batch with id {batch_id}")
    return row


def counts(db: DbSession, batch_id: uuid.UUID) -> dict[str, int]:
    """Items by status. A released item is `queued` while its turn waits and `running` until its
    outcome is settled onto the item, so counts and results always agree."""
    status = case((and_(BatchItem.status == "released", Turn.status == "queued"), "queued"),
                  (BatchItem.status == "released", "running"), else_=BatchItem.status)
    rows = db.execute(select(status, func.count()).select_from(BatchItem)
                      .outerjoin(Turn, Turn.id == BatchItem.turn_id)
                      .where(BatchItem.batch_id == batch_id).group_by(status)).all()
    result = dict.fromkeys(("pending", "queued", "running") + FINISHED_TURN_STATUSES, 0)
    result.update({name: n for name, n in rows})
    return result


def settle(db: DbSession, batch_ids: list[uuid.UUID] | None = None) -> Dispatch:
    """Copies finished turns' outcomes onto their released items; stops sessions made for them."""
    finished = (update(BatchItem)
                .where(BatchItem.turn_id == Turn.id, BatchItem.status == "released",
                       Turn.status.in_(FINISHED_TURN_STATUSES))
                .values(status=Turn.status, finished_at=func.clock_timestamp(), error=Turn.error)
                .returning(BatchItem.batch_id, BatchItem.session_id, BatchItem.config))
    if batch_ids is not None:
        finished = finished.where(BatchItem.batch_id.in_(batch_ids))
    plan = Dispatch()
    for _batch_id, session_id, config in db.execute(finished).all():
        if config is not None and session_id is not None:
            _stop_made_session(db, session_id, plan)
    return plan


def _stop_made_session(db: DbSession, session_id: uuid.UUID, plan: Dispatch) -> None:
    """A session the batch made for one item is stopped once that item is done (its workspace stays)."""
    row = db.get(Session, session_id, with_for_update=True)
    if row is None or row.status not in ("ready", "busy", "creating"):
        return
    if turn_cmds.head_queued_turn(db, row.id) is not None:
        return
    session_cmds.request_stop(db, row)
    plan.stop_sessions.append((str(row.id), row.host_queue))


def release(db: DbSession, events: EventLog, batch_id: uuid.UUID, settings: Settings, plan: Dispatch) -> None:
    """Turns the next pending items into queued turns, as far as the batch and its owner have room."""
    batch = db.get(Batch, batch_id, with_for_update=True)
    if batch is None or batch.finished_at is not None:
        return
    in_flight = db.scalar(select(func.count()).select_from(BatchItem)
                          .where(BatchItem.batch_id == batch_id, BatchItem.status == "released")) or 0
    if batch.status == "cancelled":  # it ends once its last interrupted turn has settled
        if not in_flight:
            batch.finished_at = utcnow()
            plan.finished_batches.append(str(batch_id))
        return
    owner_turns = turn_counts(db, batch.owner)
    room = min(batch.concurrency - in_flight,
               settings.owner_max_running_turns - owner_turns["running"] - owner_turns["queued"])
    session_room = settings.owner_max_sessions - live_sessions(db, batch.owner)
    queued: list[Turn] = []
    if room > 0:
        pending = db.scalars(select(BatchItem).where(BatchItem.batch_id == batch_id,
                                                     BatchItem.status == "pending")
                             .order_by(BatchItem.index).limit(room)).all()
        for item in pending:
            if item.config is not None:
                if session_room <= 0:
                    break  # waits for a session of the owner's to stop
                session_room -= 1
            turn = _release_item(db, batch, item, plan)
            if turn is not None:
                queued.append(turn)
    if queued:  # published before commit, while the sessions are locked: turn.queued comes first
        for turn, event_id in zip(queued, events.publish_many(turn_cmds.queued_event(t) for t in queued), strict=False):
            turn.queued_event_id = event_id
    if not db.scalar(select(func.count()).select_from(BatchItem).where(
            BatchItem.batch_id == batch_id, BatchItem.status.in_(("pending", "released")))):
        batch.status, batch.finished_at = "completed", utcnow()
        plan.finished_batches.append(str(batch_id))


def _release_item(db: DbSession, batch: Batch, item: BatchItem, plan: Dispatch) -> Turn | None:
    if item.session_id is not None:
        session = db.get(Session, item.session_id, with_for_update=True)
        if session is None or session.status not in CHAT_STATES:
            item.status, item.finished_at = "failed", utcnow()
            item.error = f"session {item.session_id} is {session.status if session else 'gone'}; it takes no turns"
            return None
    else:
        session = session_cmds.create_session(db, batch.owner, item.config, {"type": "ephemeral"})
        item.session_id = session.id
        plan.start_sessions.append(str(session.id))
    turn = turn_cmds.queue_turn(db, session, item.prompt, batch_id=batch.id)
    item.turn_id, item.status = turn.id, "released"
    if session.host_queue and session.status != "creating":
        plan.run_turns.append((str(turn.id), session.host_queue))
    return turn


def cancel(db: DbSession, batch: Batch, plan: Dispatch) -> None:
    """Cancels everything of the batch that has not finished: pending items, queued and running turns."""
    if batch.status != "running":
        raise WrongState(f"batch {batch.id} is {batch.status}; there is nothing to cancel", code="batch_finished")
    batch.status = "cancelled"
    db.execute(update(BatchItem).where(BatchItem.batch_id == batch.id, BatchItem.status == "pending")
               .values(status="cancelled", finished_at=func.now(), error="batch cancelled"))
    released = db.scalars(select(Turn).join(BatchItem, BatchItem.turn_id == Turn.id)
                          .where(BatchItem.batch_id == batch.id, BatchItem.status == "released")
                          .order_by(Turn.session_id)).all()
    for turn in released:
        db.scalars(select(Session.id).where(Session.id == turn.session_id).with_for_update()).one()
        db.refresh(turn)
        if turn.status in FINISHED_TURN_STATUSES:
            continue
        if turn_cmds.request_cancel(db, turn):
            plan.events.append(turn_cmds.ended_event(turn))
        else:
            plan.signal_turns.append(str(turn.id))
    db.flush()


def results(db: DbSession, batch_id: uuid.UUID, not_before: datetime | None = None
            ) -> list[tuple[BatchItem, Turn | None]]:
    """Finished items in the order they finished, those finished at `not_before` or later.

    Settling transactions commit in any order, so a follower asks again from a little before
    its last sighting and skips the items it already has.
    """
    query = (select(BatchItem, Turn).outerjoin(Turn, Turn.id == BatchItem.turn_id)
             .where(BatchItem.batch_id == batch_id, BatchItem.status.in_(FINISHED_TURN_STATUSES)))
    if not_before is not None:
        query = query.where(BatchItem.finished_at >= not_before)
    return list(db.execute(query.order_by(BatchItem.finished_at, BatchItem.index)).all())


def running_batch_ids(db: DbSession) -> list[uuid.UUID]:
    return list(db.scalars(select(Batch.id).where(Batch.status == "running")))


def advance(db_factory, events: EventLog, sender: TaskSender, cancels: CancelSignals, settings: Settings,
            batch_ids: list[uuid.UUID] | None = None) -> None:
    """Settles finished items and releases the next ones; None means every running batch."""
    with transaction(db_factory) as db:
        plan = settle(db, batch_ids)
        if batch_ids is None:
            batch_ids = running_batch_ids(db)
    for batch_id in batch_ids:
        with transaction(db_factory) as db:
            release(db, events, batch_id, settings, plan)
    carry_out(plan, events, sender, cancels)


def carry_out(plan: Dispatch, events: EventLog, sender: TaskSender, cancels: CancelSignals) -> None:
    """Does what a committed release or cancel decided: events, signals, tasks, webhooks."""
    if plan.events:
        events.publish_many(plan.events)
    cancels.send(plan.signal_turns)
    for session_id, host_queue in plan.stop_sessions:
        events.publish(status_event(session_id, "stopping"))
        sender.stop_session(session_id, host_queue)
    for session_id in plan.start_sessions:
        sender.start_session(session_id)
    for turn_id, host_queue in plan.run_turns:
        sender.run_turn(turn_id, host_queue)
    for batch_id in plan.finished_batches:
        sender.deliver_webhook("batch", batch_id)
