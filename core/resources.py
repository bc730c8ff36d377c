"""How rows become API resources: the bodies the API returns and webhooks deliver."""
from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict

from core.models import FINISHED_TURN_STATUSES


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ApprovalOut(Out):
    """A permission prompt of the turn's Claude Code and its answer (`decision`: behavior, updated_input, message,
    remember, via)."""
    id: uuid.UUID
    turn_id: uuid.UUID
    session_id: uuid.UUID
    request_id: str
    tool_name: str
    input: dict[str, Any] | None
    suggestions: list[Any] | None
    status: str
    decision: dict[str, Any] | None
    decided_by: str | None
    deadline: datetime | None
    created_at: datetime
    resolved_at: datetime | None


class TurnOut(Out):
    id: uuid.UUID
    session_id: uuid.UUID
    seq: int
    status: str
    prompt: str
    attempt: int
    result: str | None
    usage: dict[str, Any] | None
    # Metered at the model proxy (what budgets count), and its tokens by model; what Claude Code's result line said.
    cost_usd: Decimal
    metered_usage: dict[str, dict[str, int]] | None
    reported_cost_usd: Decimal | None
    duration_ms: int | None
    error: str | None
    reason: str | None
    queue_position: int | None = None
    first_event_id: str | None
    queued_event_id: str | None
    last_event_id: str | None
    cancel_requested_at: datetime | None
    batch_id: uuid.UUID | None
    webhook: str | None
    webhook_status: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Prompts waiting for an answer (POST /turns/{id}/approvals/{request_id}); empty unless approvals is "ask".
    pending_approvals: list[ApprovalOut]

    def body(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["cost_usd"] = float(self.cost_usd)
        data["reported_cost_usd"] = float(self.reported_cost_usd) if self.reported_cost_usd is not None else None
        session = f"/api/v1/sessions/{self.session_id}"
        since = f"?since={self.queued_event_id}" if self.queued_event_id else ""
        data["links"] = {"self": f"/api/v1/turns/{self.id}", "cancel": f"/api/v1/turns/{self.id}/cancel",
                         "approvals": f"/api/v1/turns/{self.id}/approvals",
                         "session": session, "events": f"{session}/events{since}", "stream": f"{session}/stream"}
        return data


class SessionOut(Out):
    id: uuid.UUID
    owner: str
    parent_id: uuid.UUID | None
    depth: int
    status: str
    config: dict[str, Any]
    workspace: dict[str, Any]
    container_id: str | None
    host_queue: str | None
    claude_session_id: uuid.UUID
    turn_count: int
    error: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    created_at: datetime
    updated_at: datetime
    last_active_at: datetime

    def body(self, latest_turn: dict | None = None, with_latest: bool = False) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"input_tokens", "output_tokens", "cost_usd"})
        data["totals"] = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                          "cost_usd": float(self.cost_usd)}
        if with_latest:
            data["latest_turn"] = latest_turn
        base = f"/api/v1/sessions/{self.id}"
        data["links"] = {"self": base, "chat": f"{base}/chat", "turns": f"{base}/turns",
                         "events": f"{base}/events", "stream": f"{base}/stream", "stop": f"{base}/stop"}
        return data


def session_body(row, latest=None, with_latest: bool = False) -> dict[str, Any]:
    latest_body = TurnOut.model_validate(latest).body() if latest is not None else None
    return SessionOut.model_validate(row).body(latest_body, with_latest)


def turn_body(row, queue_position: int | None = None) -> dict[str, Any]:
    out = TurnOut.model_validate(row)
    out.queue_position = queue_position
    return out.body()


def batch_body(row, counts: dict[str, int]) -> dict[str, Any]:
    """A batch with its items counted by status and how far along it is."""
    done = sum(counts.get(s, 0) for s in FINISHED_TURN_STATUSES)
    base = f"/api/v1/batches/{row.id}"
    return {"id": str(row.id), "status": row.status, "concurrency": row.concurrency, "total": row.total,
            "counts": counts, "progress": round(done / row.total, 4) if row.total else 1.0,
            "webhook": row.webhook, "webhook_status": row.webhook_status,
            "created_at": row.created_at.isoformat(), "finished_at": row.finished_at.isoformat() if row.finished_at else None,
            "links": {"self": base, "results": f"{base}/results", "cancel": f"{base}/cancel"}}
