"""Tool approvals: Claude Code's permission prompts as rows, their answers, and what the answers tell Claude Code."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session as DbSession

from core.envelope import Event
from core.errors import DomainError, NotFound, WrongState
from core.models import Approval, Session, Turn, utcnow
from core.resources import ApprovalOut
from core.sessions import parse_uuid

PENDING = "pending"
# The status an approval ends in, by the answer's behavior.
STATUS_OF = {"allow": "allowed", "deny": "denied"}
MAX_REQUEST_ID = 200  # the column's width; a longer id in a URL cannot name a request


class AnswerRefused(DomainError):
    """A well-formed answer that does not fit its behavior (an edited input or remember with deny)."""

    status = 422
    code = "invalid_answer"


def open_approval(db: DbSession, *, turn_id: uuid.UUID | str, session_id: uuid.UUID | str, request_id: str,
                  tool_name: str, input: dict | None, suggestions: list | None,
                  deadline: datetime | None) -> Approval:
    """The turn's approval for Claude Code's request `request_id`, made pending now or found as it was: a worker
    that re-attaches reads the request's line again and gets the same row (and the answer it may already have)."""
    turn = uuid.UUID(str(turn_id))
    webhook = db.scalar(select(Turn.webhook).where(Turn.id == turn))
    db.execute(insert(Approval).values(
        id=uuid.uuid4(), turn_id=turn, session_id=uuid.UUID(str(session_id)), request_id=request_id,
        tool_name=tool_name, input=input, suggestions=suggestions, status=PENDING, deadline=deadline,
        created_at=utcnow(), webhook=webhook, webhook_status="pending" if webhook else None, webhook_attempts=0,
    ).on_conflict_do_nothing(index_elements=["turn_id", "request_id"]))
    return db.scalars(select(Approval).where(Approval.turn_id == turn, Approval.request_id == request_id)
                      .execution_options(populate_existing=True)).one()


def resolve(db: DbSession, *, owner: str, turn_id: str, request_id: str, behavior: str,
            updated_input: dict | None = None, message: str | None = None, remember: bool = False,
            decided_by: str, via: str) -> Approval:
    """Answers a pending approval of one of the owner's turns (a child session's too: it has the same owner).

    The row is locked (SELECT ... FOR UPDATE) before its status is read, so of two answers at once one resolves it
    and the other is a 409 `approval_resolved`. NotFound for an unknown turn or request, and another owner's.
    remember (allow only) adds the request's rules to the session's approval_rules, de-duplicated.
    """
    if behavior not in STATUS_OF:
        raise AnswerRefused("behavior must be allow or deny", field="behavior")
    if behavior == "deny" and (updated_input is not None or remember):
        raise AnswerRefused("updated_input and remember go with allow only; a deny takes a message",
                            field="updated_input" if updated_input is not None else "remember")
    approval = find_owned(db, owner, turn_id, request_id)
    # The session first, then the approval: the order the ends of turns lock them in.
    session = db.get(Session, approval.session_id, with_for_update=True) if remember else None
    db.refresh(approval, with_for_update=True)  # as it is now that no one else can answer it under us
    if approval.status != PENDING:
        raise WrongState(f"approval {request_id} is {approval.status} already", code="approval_resolved")
    decision: dict[str, Any] = {"behavior": behavior, "remember": remember, "via": via}
    if updated_input is not None:
        decision["updated_input"] = updated_input
    if message is not None:
        decision["message"] = message
    approval.status, approval.decision, approval.decided_by = STATUS_OF[behavior], decision, decided_by
    approval.resolved_at = utcnow()
    if session is not None:
        existing = list(session.approval_rules or [])
        session.approval_rules = existing + [rule for rule in rules_of(approval) if rule not in existing]
    db.flush()
    return approval


def find_owned(db: DbSession, owner: str, turn_id: str, request_id: str) -> Approval:
    """The approval, when it belongs to a turn of the owner's; NotFound otherwise (whoever else's it is)."""
    turn = parse_uuid(turn_id, "turn")
    if "\x00" in request_id or len(request_id) > MAX_REQUEST_ID:  # could name no row; Postgres refuses NUL
        raise NotFound(f"no approval request {request_id!r} on turn {turn_id}")
    found = db.scalars(select(Approval).join(Session, Session.id == Approval.session_id).where(
        Approval.turn_id == turn, Approval.request_id == request_id, Session.owner == owner)).first()
    if found is None:
        raise NotFound(f"no approval request {request_id!r} on turn {turn_id}")
    return found


def list_for_turn(db: DbSession, turn_id: uuid.UUID) -> list[Approval]:
    """Every approval of the turn, oldest first."""
    return list(db.scalars(select(Approval).where(Approval.turn_id == turn_id).order_by(Approval.created_at)))


def time_out(db: DbSession, turn_id: uuid.UUID | str, request_id: str) -> Approval | None:
    """Denies the approval when it is still pending past its deadline (status timed_out); None when it is not
    (answered first, or not due yet)."""
    approval = db.scalars(select(Approval).where(
        Approval.turn_id == uuid.UUID(str(turn_id)), Approval.request_id == request_id).with_for_update()).first()
    if approval is None or approval.status != PENDING or approval.deadline is None or approval.deadline > utcnow():
        return None
    approval.status, approval.resolved_at = "timed_out", utcnow()
    approval.decision = {"behavior": "deny", "remember": False, "via": "timeout"}
    db.flush()
    return approval


def pending(db: DbSession, turn_id: uuid.UUID | str) -> list[Approval]:
    """The turn's approvals still waiting for an answer, oldest first."""
    return list(db.scalars(select(Approval).where(
        Approval.turn_id == uuid.UUID(str(turn_id)), Approval.status == PENDING).order_by(Approval.created_at)))


def rules_of(approval: Approval) -> list[str]:
    """The allow rules an approval's remember adds, in Claude Code's syntax: those of its permission suggestions'
    `addRules` entries ("Tool(ruleContent)", or "Tool"), else the tool's name."""
    rules: list[str] = []
    for suggestion in approval.suggestions or []:
        if not isinstance(suggestion, dict) or suggestion.get("type") != "addRules":
            continue
        if suggestion.get("behavior", "allow") != "allow":
            continue
        for rule in suggestion.get("rules") or []:
            if isinstance(rule, dict) and isinstance(rule.get("toolName"), str) and rule["toolName"]:
                content = rule.get("ruleContent")
                text = f"{rule['toolName']}({content})" if isinstance(content, str) and content else rule["toolName"]
                if text not in rules:
                    rules.append(text)
    return rules or [approval.tool_name]


def remembered_permissions(approval: Approval) -> list[dict]:
    """What Claude Code is told to keep for the rest of its process: its own suggestions, or a rule for the tool."""
    if approval.suggestions:
        return approval.suggestions
    return [{"type": "addRules", "rules": [{"toolName": approval.tool_name}], "behavior": "allow",
             "destination": "session"}]


def denial_message(approval: Approval) -> str:
    """What the model reads when an answer without a message, a timeout or the turn's end denied the tool."""
    decision = approval.decision or {}
    if approval.status == "timed_out":
        return "Nobody answered this permission request before its deadline, so it was denied."
    if approval.status == "cancelled":
        return "The turn ended before this permission request was answered, so it was denied."
    return f"The user ({approval.decided_by or 'the owner'}) denied this tool use" + (
        " through the API." if decision.get("via") in ("rest", "websocket") else ".")


def control_answer(approval: Approval) -> dict:
    """The `response` of Claude Code's control_response for the approval (it must not be pending)."""
    decision = approval.decision or {}
    if approval.status == "allowed":
        updated = decision.get("updated_input")
        answer = {"behavior": "allow", "updatedInput": updated if updated is not None else (approval.input or {})}
        if decision.get("remember"):
            answer["updatedPermissions"] = remembered_permissions(approval)
        return answer
    return {"behavior": "deny", "message": decision.get("message") or denial_message(approval)}


def iso(moment: datetime | None) -> str | None:
    """An event's timestamp as the envelope's `ts` is written: UTC, milliseconds, Z."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def requested_event(approval: Approval, turn_seq: int | None) -> Event:
    """approval.requested: what Claude Code asks to run, and until when an answer is awaited."""
    return Event(session_id=str(approval.session_id), turn_id=str(approval.turn_id), seq=turn_seq,
                 type="approval.requested",
                 data={"request_id": approval.request_id, "tool_name": approval.tool_name, "input": approval.input,
                       "suggestions": approval.suggestions, "deadline": iso(approval.deadline)})


def resolved_event(approval: Approval, turn_seq: int | None) -> Event:
    """approval.resolved: how the approval ended, who decided and through what (rest, websocket, timeout,
    turn_ended)."""
    decision = approval.decision or {}
    data = {"request_id": approval.request_id, "status": approval.status,
            "behavior": "allow" if approval.status == "allowed" else "deny", "decided_by": approval.decided_by,
            "via": decision.get("via", "turn_ended" if approval.status == "cancelled" else None),
            "resolved_at": iso(approval.resolved_at), "remember": bool(decision.get("remember"))}
    for key in ("updated_input", "message"):
        if key in decision:
            data[key] = decision[key]
    return Event(session_id=str(approval.session_id), turn_id=str(approval.turn_id), seq=turn_seq,
                 type="approval.resolved", data=data)


def approval_body(approval: Approval) -> dict:
    """The approval as the API shows it."""
    return ApprovalOut.model_validate(approval).model_dump(mode="json")


def webhook_body(approval: Approval) -> dict:
    """What the turn's webhook receives when Claude Code asks (the approval as it is at delivery)."""
    return {"event": "approval.requested", "turn_id": str(approval.turn_id), "session_id": str(approval.session_id),
            "approval": approval_body(approval)}
