"""Batches: many prompts taken in at once, released as turns at most `concurrency` at a time.

Items wait in Postgres as `pending`; `release` turns the next ones into queued turns when the
batch and the owner have room; `settle` copies a finished turn's status onto its item. Both
run from wherever a turn ends (worker, cancel, reaper), so a batch always moves on.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session as DbSession

from core import sessions as session_cmds
from core import trees, workspaces
from core import turns as turn_cmds
from core.admission import Room, lock_owner, turn_counts
from core.cancels import CancelSignals
from core.db import transaction
from core.envelope import Event, status_event
from core.events import EventLog
from core.errors import DomainError, NotFound, ValidationFailed, WrongState
from core.models import FINISHED_TURN_STATUSES, Batch, BatchItem, Session, Turn, utcnow
from core.sessions import CHAT_STATES, parse_uuid
from core.queues import TaskSender
from core.settings import Settings

# What a session made for one batch item starts with (an ephemeral workspace, like POST /sessions' default).
ITEM_WORKSPACE = {"type": "ephemeral"}


@dataclass
class Dispatch:
    """What a release or cancel decided, to do after its transaction commits."""

    events: list[Event] = field(default_factory=list)
    start_sessions: list[str] = field(default_factory=list)
    run_turns: list[tuple[str, str]] = field(default_factory=list)  # (turn id, host queue)
    stop_sessions: list[tuple[str, str | None]] = field(default_factory=list)
    signal_turns: list[str] = field(default_factory=list)
    finished_batches: list[str] = field(default_factory=list)

    def merge(self, other: "Dispatch") -> None:
        for name, value in vars(other).items():
            getattr(self, name).extend(value)


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
    """The batch row and all its items as `pending`; the items go in with one COPY."""
    batch = Batch(id=uuid.uuid4(), owner=owner, status="running", concurrency=concurrency,
                  total=len(items), webhook=webhook, webhook_status="pending" if webhook else None,
                  created_at=utcnow())
    db.add(batch)
    db.flush()
    copy_rows(db, BatchItem, [{"batch_id": batch.id, "index": i, "custom_id": item.get("custom_id"),
                               "prompt": item["prompt"], "session_id": item.get("session_id"),
                               "config": item.get("config"), "status": "pending"}
                              for i, item in enumerate(items)])
    return batch


def copy_rows(db: DbSession, model: type, rows: list[dict[str, Any]]) -> None:
    """Rows into the model's table with one COPY, in the session's transaction (no statement per row).

    Every row has the same keys; columns they leave out get the model's Python-side defaults, as an
    ORM insert would give them.
    """
    if not rows:
        return
    table = model.__table__
    given = list(rows[0])
    defaults = {c.name: c.default for c in table.columns
                if c.name not in rows[0] and c.default is not None and (c.default.is_scalar or c.default.is_callable)}
    names = given + list(defaults)
    json_at = [i for i, name in enumerate(names) if isinstance(table.c[name].type, JSONB)]  # COPY takes JSON text
    columns = ", ".join(f'"{name}"' for name in names)
    raw = db.connection().connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
        for row in rows:
            values = [row[name] for name in given]
            values += [d.arg if d.is_scalar else d.arg(None) for d in defaults.values()]
            for i in json_at:
                if values[i] is not None:
                    values[i] = json.dumps(values[i])
            copy.write_row(values)


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
    if turn_cmds.next_turn_id(db, row.id) is not None:
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
    if room > 0:
        lock_owner(db, batch.owner)  # before the sessions' locks below, as every admission takes them
        owner_room = Room.of(db, batch.owner, settings)
        pending = db.execute(select(BatchItem.index, BatchItem.prompt, BatchItem.session_id, BatchItem.config)
                             .where(BatchItem.batch_id == batch_id, BatchItem.status == "pending")
                             .order_by(BatchItem.index).limit(room)).all()
        restarts = stopped_configs(db, {item.session_id for item in pending if item.config is None})
        chosen = []
        for item in pending:
            # A new session, or a stopped one its turn starts again (counted once), must fit the owner's limits.
            config = item.config if item.config is not None else restarts.pop(item.session_id, None)
            if config is not None:
                if owner_room.refusal(config):
                    break  # waits for a session of the owner's to stop
                owner_room.take(config)
            chosen.append(item)
        if chosen:
            _release_items(db, events, batch, chosen, plan)
    if not db.scalar(select(func.count()).select_from(BatchItem).where(
            BatchItem.batch_id == batch_id, BatchItem.status.in_(("pending", "released")))):
        batch.status, batch.finished_at = "completed", utcnow()
        plan.finished_batches.append(str(batch_id))


def stopped_configs(db: DbSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, dict]:
    """The configs of those of these sessions that are stopped (a turn for one starts it again)."""
    if not ids:
        return {}
    return dict(db.execute(select(Session.id, Session.config)
                           .where(Session.id.in_(ids), Session.status == "stopped")).all())


@dataclass(frozen=True)
class NewTurn:
    """A turn a release is about to insert: what its row and its `turn.queued` event need."""

    id: uuid.UUID
    session_id: uuid.UUID
    seq: int
    prompt: str


def _release_items(db: DbSession, events: EventLog, batch: Batch, items: list, plan: Dispatch) -> None:
    """Queued turns for these pending items in a few statements however many they are: the named
    sessions locked at once, new sessions and turns streamed in with COPY, the items updated in one go."""
    now = utcnow()
    wanted = {item.session_id for item in items if item.config is None}
    named = _lock_sessions(db, wanted)
    refusals = {sid: _refusal(db, named.get(sid), sid) for sid in wanted}
    turns: list[NewTurn] = []
    made: list[dict[str, Any]] = []
    marks: list[tuple[int, uuid.UUID | None, uuid.UUID | None, str | None]] = []  # index, turn, session, error
    for item in items:
        if item.config is None:
            if refusals[item.session_id]:
                marks.append((item.index, None, None, refusals[item.session_id]))
                continue
            session = named[item.session_id]
            session.turn_count += 1
            session.last_active_at = now
            turn = NewTurn(uuid.uuid4(), session.id, session.turn_count, item.prompt)
        else:
            made.append(_made_session(batch.owner, item.config, now))
            turn = NewTurn(uuid.uuid4(), made[-1]["id"], 1, item.prompt)
        turns.append(turn)
        marks.append((item.index, turn.id, turn.session_id, None))
    db.flush()  # the named sessions' turn counts, before their turns go in
    copy_rows(db, Session, made)
    # Published before commit, while the sessions are locked: turn.queued comes first in each stream.
    event_ids = events.publish_many(turn_cmds.queued_event(t) for t in turns) if turns else []
    copy_rows(db, Turn, [{"id": t.id, "session_id": t.session_id, "seq": t.seq, "prompt": t.prompt,
                          "status": "queued", "batch_id": batch.id, "queued_event_id": event_id, "created_at": now}
                         for t, event_id in zip(turns, event_ids, strict=True)])
    _mark_items(db, batch.id, marks)
    plan.start_sessions.extend(str(row["id"]) for row in made)
    plan.run_turns.extend(_session_heads(turns, named))


def _lock_sessions(db: DbSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, Session]:
    """The sessions items name, locked in one statement, in id order (so two releases cannot deadlock)."""
    if not ids:
        return {}
    rows = db.scalars(select(Session).where(Session.id.in_(ids)).order_by(Session.id).with_for_update())
    return {row.id: row for row in rows}


def _refusal(db: DbSession, session: Session | None, session_id: uuid.UUID) -> str | None:
    """Why a named session takes no turn (gone, ended, its tree's budget spent, its workspace held), else None."""
    if session is None or session.status not in CHAT_STATES:
        return f"session {session_id} is {session.status if session else 'gone'}; it takes no turns"
    try:
        trees.check_budget(db, session)
        if session.status == "stopped":  # it restarts for these turns, so it must hold its workspace again
            workspaces.hold(db, session)
    except DomainError as exc:  # the item fails; the rest of the batch goes on
        return exc.message
    return None


def _made_session(owner: str, config: dict, now: datetime) -> dict[str, Any]:
    """The row of a session made for one item, as `sessions.create_session` makes it, with its one turn."""
    session_id = uuid.uuid4()
    return {"id": session_id, "owner": owner, "config": config, "workspace": ITEM_WORKSPACE, "parent_id": None,
            "depth": 0, "root_id": session_id, "status": "creating", "claude_session_id": uuid.uuid4(),
            "turn_count": 1, "created_at": now, "updated_at": now, "last_active_at": now}


def _mark_items(db: DbSession, batch_id: uuid.UUID, marks: list[tuple]) -> None:
    """Released items get their turn and session, refused ones their error: one UPDATE from arrays."""
    indexes, turn_ids, session_ids, errors = (list(column) for column in zip(*marks, strict=True))
    db.execute(text(
        "UPDATE batch_items SET turn_id = m.turn_id, session_id = coalesce(m.session_id, batch_items.session_id),"
        " status = CASE WHEN m.error IS NULL THEN 'released' ELSE 'failed' END, error = m.error,"
        " finished_at = CASE WHEN m.error IS NULL THEN NULL ELSE clock_timestamp() END"
        " FROM unnest(CAST(:indexes AS integer[]), CAST(:turn_ids AS uuid[]), CAST(:session_ids AS uuid[]),"
        " CAST(:errors AS text[])) AS m(index, turn_id, session_id, error)"
        " WHERE batch_items.batch_id = :batch_id AND batch_items.index = m.index"),
        {"batch_id": batch_id, "indexes": indexes, "turn_ids": turn_ids, "session_ids": session_ids,
         "errors": errors})


def _session_heads(turns: list[NewTurn], named: dict[uuid.UUID, Session]) -> list[tuple[str, str]]:
    """One run_turn per existing session, for its first new turn: when a turn ends its worker sends the
    session's next one, so tasks for the later turns would only be dropped. A new session's start task
    sends its turn; a `creating` one's will too."""
    heads: dict[uuid.UUID, tuple[str, str]] = {}
    for turn in turns:
        session = named.get(turn.session_id)
        if session is not None and session.host_queue and session.status != "creating":
            heads.setdefault(turn.session_id, (str(turn.id), session.host_queue))
    return list(heads.values())


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
        ended = turn_cmds.request_cancel(db, turn)
        if ended is not None:
            plan.events.append(ended)
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
    plan = Dispatch()
    try:
        decide(db_factory, events, settings, batch_ids, plan)
    finally:  # what committed before a failure is carried out all the same
        carry_out(plan, events, sender, cancels)


def decide(db_factory, events: EventLog, settings: Settings, batch_ids: list[uuid.UUID] | None,
           plan: Dispatch) -> None:
    """The committed half of `advance`: settles and releases, adding what to carry out to `plan`."""
    with transaction(db_factory) as db:
        plan_settled = settle(db, batch_ids)
        if batch_ids is None:
            batch_ids = running_batch_ids(db)
    plan.merge(plan_settled)
    for batch_id in batch_ids:
        with transaction(db_factory) as db:
            release(db, events, batch_id, settings, plan)


def carry_out(plan: Dispatch, events: EventLog, sender: TaskSender, cancels: CancelSignals) -> None:
    """Does what a committed release or cancel decided: events, signals, tasks, webhooks."""
    if plan.events:
        events.publish_many(plan.events)
    cancels.send(plan.signal_turns)
    for session_id, host_queue in plan.stop_sessions:
        events.publish(status_event(session_id, "stopping"))
        sender.stop_session(session_id, host_queue)
    sender.start_sessions(plan.start_sessions)
    sender.run_turns(plan.run_turns)
    for batch_id in plan.finished_batches:
        sender.deliver_webhook("batch", batch_id)
