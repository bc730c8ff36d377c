"""Request and response models of the HTTP API (pydantic), and how rows become responses."""
from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PERMISSION_MODES = Literal["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(Strict):
    memory_mb: int = Field(2048, ge=128, le=65536)
    cpus: float = Field(1.0, gt=0, le=64)
    pids: int = Field(512, ge=32, le=32768)


class Timeouts(Strict):
    turn_seconds: int | None = Field(None, ge=1, le=86400,
                                     description="capped by CONTAINER_TIMEOUT_DEFAULT")


class SessionConfig(Strict):
    model: str | None = Field(None, min_length=1, max_length=200)
    append_system_prompt: str | None = Field(None, max_length=100_000)
    allowed_tools: list[str] | None = Field(None, max_length=100)
    # The container is the sandbox, so by default the agent may use its tools without asking.
    permission_mode: PERMISSION_MODES = "bypassPermissions"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("allowed_tools")
    @classmethod
    def _tool_names(cls, tools: list[str] | None) -> list[str] | None:
        for tool in tools or []:
            if not tool or len(tool) > 200 or "," in tool:
                raise ValueError("each tool is a non-empty name without commas, at most 200 characters")
        return tools


class Workspace(Strict):
    type: Literal["ephemeral"] = "ephemeral"


class CreateSession(Strict):
    workspace: Workspace = Field(default_factory=Workspace)
    config: SessionConfig = Field(default_factory=SessionConfig)


class ChatRequest(Strict):
    prompt: str = Field(min_length=1, max_length=500_000)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is blank")
        return prompt


class PageQuery(Strict):
    limit: int = Field(50, ge=1, le=200)
    offset: int = Field(0, ge=0)


class SessionListQuery(PageQuery):
    status: Literal["creating", "ready", "busy", "stopping", "stopped", "failed", "deleted"] | None = None


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TurnOut(Out):
    id: uuid.UUID
    session_id: uuid.UUID
    seq: int
    status: str
    prompt: str
    attempt: int
    result: str | None
    usage: dict[str, Any] | None
    cost_usd: Decimal | None
    duration_ms: int | None
    error: str | None
    first_event_id: str | None
    last_event_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def body(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["cost_usd"] = float(self.cost_usd) if self.cost_usd is not None else None
        data["links"] = {
            "self": f"/api/v1/turns/{self.id}",
            "session": f"/api/v1/sessions/{self.session_id}",
            "stream": f"/api/v1/sessions/{self.session_id}/stream",
        }
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
                         "stream": f"{base}/stream", "stop": f"{base}/stop"}
        return data


def session_body(row, latest=None, with_latest: bool = False) -> dict[str, Any]:
    latest_body = TurnOut.model_validate(latest).body() if latest is not None else None
    return SessionOut.model_validate(row).body(latest_body, with_latest)


def turn_body(row) -> dict[str, Any]:
    return TurnOut.model_validate(row).body()
