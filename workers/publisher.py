"""Publishes one turn's events in batches: a line never waits while Redis is idle, and lines that arrive
while a publish is in flight go out together in the next one (group commit), fenced by the turn's mark."""
from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy.exc import OperationalError

from core.claimed import ClaimedSession, ClaimedTurn
from core.envelope import Event
from core.events import EventLog
from workers import metrics

log = logging.getLogger(__name__)

# How long a turn waits for Postgres or Redis to come back before leaving the rest to the reaper.
OUTAGE_PATIENCE_SECONDS = 60.0
SERVICE_DOWN = (OperationalError, redis.ConnectionError, redis.TimeoutError)
# One publish is one Lua script, which holds Redis while it runs: a batch stays small enough to be quick.
MAX_BATCH_EVENTS = 256
MAX_BATCH_BYTES = 1 << 20
# Past this much waiting to be published, `add` waits too, so a slow Redis slows the reader, not memory.
MAX_QUEUED_BYTES = 16 << 20


def retry_while_down(step, what: str, patience: float = OUTAGE_PATIENCE_SECONDS):
    """Runs a step that needs Postgres or Redis, retrying while either is unreachable, for up to
    `patience` seconds.

    Past that the error propagates: the turn's lease then runs out and the reaper hands the turn
    to a worker that re-attaches and publishes or records the rest, so nothing is lost either way.
    """
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return step()
        except SERVICE_DOWN as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("could not %s (%s unreachable: %s); retrying in %.1fs", what,
                        "Redis" if isinstance(exc, redis.RedisError) else "the database",
                        getattr(exc, "orig", None) or exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclass
class Pending:
    """One event waiting to be published, and, once it is, its stream id."""

    kind: str
    number: int
    id_field: str
    fields: dict[str, str]
    size: int
    id: str | None = None


class Publisher:
    """Publishes one turn's events in order from a thread of its own, many per round trip; one thread adds.

    When a later attempt owns the turn (or its final event is out), `turn.lost` is set and everything else is
    dropped. An error that outlasts `patience` (Redis away) is raised by the next `add`, `publish` or `flush`.
    """

    def __init__(self, events: EventLog, session: ClaimedSession, turn: ClaimedTurn, *,
                 max_events: int = MAX_BATCH_EVENTS, max_bytes: int = MAX_BATCH_BYTES,
                 max_queued_bytes: int = MAX_QUEUED_BYTES, patience: float = OUTAGE_PATIENCE_SECONDS) -> None:
        self.events, self.session, self.turn = events, session, turn
        self.max_events, self.max_bytes, self.max_queued_bytes = max_events, max_bytes, max_queued_bytes
        self.patience = patience
        self.round_trips = 0  # publishes made, for tests and benchmarks
        self._queue: deque[Pending] = deque()
        self._queued_bytes = 0
        self._busy = False  # a batch is on its way to Redis
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, kind: str, data: dict[str, Any], number: int, id_field: str = "last") -> Pending | None:
        """Queues an event marking wrapper line `number` as published (its id goes under `id_field` in the
        mark: "first", "last" or "final"); returns at once unless much is queued. None when the turn is lost."""
        if self.turn.lost:
            return None
        item = self._pending(kind, data, number, id_field)
        with self._cond:
            while self._queued_bytes > self.max_queued_bytes and self._error is None and not self.turn.lost:
                self._cond.wait()
            self._raise_failure()
            if self.turn.lost:
                return None
            self._queue.append(item)
            self._queued_bytes += item.size
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                                name=f"publish-{self.turn.id[:8]}", daemon=True)
                self._thread.start()
        return item

    def publish(self, kind: str, data: dict[str, Any], number: int, id_field: str = "last") -> str | None:
        """Publishes an event after everything queued before it and waits; its stream id, or None when it
        was not published (a later attempt owns the turn, or its final event is out).

        Sent from the calling thread, once the queue is empty: no hand-over for the turn's first and
        final events, whose ids the caller needs at once.
        """
        self.flush()
        if self.turn.lost:
            return None
        item = self._pending(kind, data, number, id_field)
        with self._cond:
            self._busy = True  # the publishing thread waits meanwhile, so order holds
        try:
            ids = retry_while_down(functools.partial(self._send, [item]),
                                   what=f"publish an event of turn {self.turn.id}", patience=self.patience)
        except BaseException:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            raise
        self._done([item], ids)
        return item.id

    def flush(self) -> None:
        """Waits until everything queued is published, or dropped because the turn is lost."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()
            self._raise_failure()

    def close(self) -> None:
        """Publishes what is still queued and stops the thread; a failure was already raised or is dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _pending(self, kind: str, data: dict[str, Any], number: int, id_field: str) -> Pending:
        """The event, encoded now: its time is when it arrived, and its size bounds the batch it joins."""
        event = Event(session_id=self.session.id, turn_id=self.turn.id, seq=self.turn.seq, type=kind,
                      data=data)
        fields = event.to_fields()
        return Pending(kind, number, id_field, fields, sum(len(v) for v in fields.values()))

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        """The publishing thread: takes everything queued (up to a batch) and publishes it in one call."""
        while True:
            with self._cond:
                while (not self._queue or self._busy) and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take_batch()
                self._busy = True
            try:
                ids = retry_while_down(functools.partial(self._send, batch),
                                       what=f"publish events of turn {self.turn.id}", patience=self.patience)
            except BaseException as exc:  # given to the caller, whose next call raises it
                with self._cond:
                    self._error, self._busy = exc, False
                    self._drop_queue()
                    self._cond.notify_all()
                return
            self._done(batch, ids)

    def _take_batch(self) -> list[Pending]:
        """The oldest queued events, up to the batch bounds (always at least one)."""
        batch, size = [], 0
        while self._queue and len(batch) < self.max_events and (not batch or size + self._queue[0].size
                                                                <= self.max_bytes):
            item = self._queue.popleft()
            batch.append(item)
            size += item.size
        self._queued_bytes -= size
        return batch

    def _send(self, batch: list[Pending]) -> list[str | None] | None:
        self.round_trips += 1
        return self.events.publish_encoded_marked(self.session.id,
                                                  [(item.number, item.id_field, item.fields) for item in batch],
                                                  self.turn.id, self.turn.attempt)

    def _done(self, batch: list[Pending], ids: list[str | None] | None) -> None:
        """Records the batch's ids; a refused batch means a later attempt owns the turn."""
        if ids is None:
            self.turn.lost = True
        else:
            for item, stream_id in zip(batch, ids, strict=True):
                item.id = stream_id
                if stream_id is not None:
                    metrics.event_published(self.turn, item.kind)
        with self._cond:
            self._busy = False
            if ids is None:
                self._drop_queue()
            self._cond.notify_all()

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._queued_bytes = 0

