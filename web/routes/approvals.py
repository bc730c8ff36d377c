"""Approval routes: a turn's permission prompts, and the owner's answer to one."""
from __future__ import annotations

import logging

import redis
from flask import g

from core import approvals
from core import turns as turn_cmds
from core.models import Turn
from web.api import api, json_body
from web.auth import refuse_agent
from web.context import ctx, unit_of_work
from web.schemas import ApprovalAnswer

log = logging.getLogger(__name__)


@api.post("/turns/<turn_id>/approvals/<request_id>")
def answer_approval(turn_id: str, request_id: str):
    """Allows or denies one pending prompt: 200 with the approval; 409 `approval_resolved` once it was answered."""
    return answer(g.claims, turn_id, request_id, json_body(ApprovalAnswer), via="rest")


@api.get("/turns/<turn_id>/approvals")
def list_approvals(turn_id: str):
    """Every prompt of the turn, answered or not, oldest first."""
    with unit_of_work() as db:
        turn = turn_cmds.get_owned_turn(db, g.owner, turn_id)
        return {"approvals": [approvals.approval_body(a) for a in approvals.list_for_turn(db, turn.id)]}


def answer(claims: dict, turn_id: str, request_id: str, spec: ApprovalAnswer, via: str) -> dict:
    """Resolves the approval as the token's owner, then tells the session's stream and the turn's worker."""
    refuse_agent(claims, "answer approvals")
    with unit_of_work() as db:
        approval = approvals.resolve(db, owner=claims["sub"], turn_id=turn_id, request_id=request_id,
                                     behavior=spec.behavior, updated_input=spec.updated_input, message=spec.message,
                                     remember=spec.remember, decided_by=claims["sub"], via=via)
        event = approvals.resolved_event(approval, db.get(Turn, approval.turn_id).seq)
        body = approvals.approval_body(approval)
    # After the commit: the worker that wakes reads the answer from the row. The answer stands when Redis does not
    # take these (the row is the record); the worker then finds it when it next looks at its turn's approvals.
    try:
        ctx().events.publish(event)
        ctx().cancels.send([body["turn_id"]], "answer")
    except redis.RedisError as exc:
        log.warning("approval %s of turn %s answered, but not announced: %s", request_id, turn_id, exc)
    return body
