"""The worker's side of tool approvals: Claude Code's permission prompts become approvals (a row and an
`approval.requested` event), and their answers, given by REST or WebSocket on any web process, reach the turn's
Claude Code through its container's turn agent. Prompts nobody answers in time are denied here."""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from sqlalchemy import select, update

from core import approvals
from core.db import transaction
from core.models import Approval, utcnow
from workers.runtime import NotRunning

log = logging.getLogger(__name__)


class TurnApprovals:
    """The approvals of one running turn, as its worker sees them. `requested`/`withdrawn` are called by the thread
    that reads the turn's lines; `deliver` and `expire` by its watcher thread."""

    def __init__(self, ctx, session: dict, turn: dict, where: dict) -> None:
        self.ctx, self.session, self.turn, self.where = ctx, session, turn, where
        self.deadlines: dict[str, float] = {}  # pending request id → deadline (unix time)
        self.delivered: set[str] = set()
        self.lock = threading.Lock()
        timeout = (session.config or {}).get("approval_timeout_seconds")
        self.timeout = int(timeout or ctx.settings.approval_timeout_seconds)

    def requested(self, line: dict, number: int, publisher) -> None:
        """A `can_use_tool` control request: recorded (once, however often the line is read), announced."""
        request = line.get("request") if isinstance(line.get("request"), dict) else {}
        request_id = line.get("request_id")
        if request.get("subtype") != "can_use_tool" or not isinstance(request_id, str):
            return
        tool = request.get("tool_name") if isinstance(request.get("tool_name"), str) else "unknown"
        tool_input = request.get("input") if isinstance(request.get("input"), dict) else {}
        suggestions = request.get("permission_suggestions")
        with transaction(self.ctx.db) as db:
            approval = approvals.open_approval(
                db, turn_id=uuid.UUID(self.turn.id), session_id=uuid.UUID(self.session.id),
                request_id=request_id, tool_name=tool[:200], input=tool_input,
                suggestions=suggestions if isinstance(suggestions, list) else None,
                deadline=utcnow() + timedelta(seconds=self.timeout))
            event = approvals.requested_event(approval, self.turn.seq)
            pending, approval_id = approval.status == "pending", str(approval.id)
            deadline = approval.deadline.timestamp() if approval.deadline else None
        if publisher is not None:  # None: a line read again after a takeover, published already
            publisher.add(event.type, event.data, number)
        if pending and deadline is not None:
            with self.lock:
                self.deadlines[request_id] = deadline
            if self.turn.webhook:
                self.ctx.sender.deliver_webhook("approval", approval_id)
        else:  # answered already (this line is read again after a takeover): Claude Code may still wait for it
            self.deliver()

    def withdrawn(self, line: dict) -> None:
        """Claude Code no longer waits for a prompt (a `control_cancel_request`, e.g. after an interrupt)."""
        request_id = line.get("request_id")
        if not isinstance(request_id, str):
            return
        with self.lock:
            self.deadlines.pop(request_id, None)
        self._end_pending([request_id], "cancelled", "turn_ended")

    def deliver(self) -> None:
        """Passes every answered prompt of the turn not yet passed on to its Claude Code (after a takeover, all of
        them once: the agent ignores answers to prompts it no longer waits for)."""
        container = self.where.get("container")
        if not container:
            return
        with transaction(self.ctx.db) as db:
            answered = db.scalars(select(Approval).where(Approval.turn_id == uuid.UUID(self.turn.id),
                                                         Approval.status != "pending")).all()
            answers = [(a.request_id, approvals.control_answer(a)) for a in answered
                       if a.request_id not in self.delivered]
        for request_id, response in answers:
            with self.lock:
                self.deadlines.pop(request_id, None)
            try:
                outcome = self.ctx.runtime.agent_control(container, {
                    "control": "answer", "turn_id": self.turn.id, "request_id": request_id, "response": response})
            except NotRunning:
                return
            except Exception as exc:  # tried again on the next signal or deadline
                log.warning("turn %s: could not pass on the answer to %s: %s", self.turn.id, request_id, exc)
                return
            self.delivered.add(request_id)
            log.info("turn %s: approval %s answered (%s)", self.turn.id, request_id, outcome)

    def expire(self, now: float) -> None:
        """Denies the prompts whose deadline passed, then passes the denials on."""
        with self.lock:
            due = [request_id for request_id, deadline in self.deadlines.items() if deadline <= now]
            for request_id in due:
                self.deadlines.pop(request_id)
        if not due:
            return
        timed_out = []
        with transaction(self.ctx.db) as db:
            for request_id in due:
                approval = approvals.time_out(db, uuid.UUID(self.turn.id), request_id)
                if approval is not None:
                    timed_out.append(approvals.resolved_event(approval, self.turn.seq))
        for event in timed_out:
            self.ctx.events.publish(event)
        self.deliver()

    def _end_pending(self, request_ids: list[str], status: str, via: str) -> None:
        """Marks prompts Claude Code stopped waiting for as ended, and says so in the stream."""
        with transaction(self.ctx.db) as db:
            rows = db.scalars(update(Approval).where(
                Approval.turn_id == uuid.UUID(self.turn.id), Approval.request_id.in_(request_ids),
                Approval.status == "pending").values(
                status=status, resolved_at=utcnow(), decision={"via": via}).returning(Approval)).all()
            events = [approvals.resolved_event(row, self.turn.seq) for row in rows]
        for event in events:
            self.ctx.events.publish(event)
        self.delivered.update(request_ids)

    def next_deadline(self) -> float | None:
        with self.lock:
            return min(self.deadlines.values(), default=None)
