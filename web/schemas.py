"""Request models of the HTTP API (pydantic); responses are built by core/resources.py."""
from __future__ import annotations

import uuid
from typing import Any, Literal

from flask import current_app, has_app_context
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import TooLarge
from core.limits import DEFAULT_LIMITS
from core.settings import Settings

MIN_DISK_MB = 10  # Claude Code's own files in the home volume take a few hundred KB
DEFAULT_DISK_MB = 10240  # CCD_DISK_MB_DEFAULT outside an app


def app_settings() -> Settings | None:
    """The settings of the app serving this request; None outside one."""
    if has_app_context() and "ccd" in current_app.extensions:
        return current_app.extensions["ccd"].settings
    return None


PERMISSION_MODES = Literal["default", "acceptEdits", "bypassPermissions", "plan", "dontAsk"]


def no_nul(value: Any) -> Any:
    """Postgres text cannot hold NUL (\\u0000): refused here (a 400), not by the INSERT (a 500; fuzzing found it)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text may not contain NUL characters (\\u0000)")
    elif isinstance(value, dict):
        for key, item in value.items():
            no_nul(key)
            no_nul(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            no_nul(item)
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _no_nul = field_validator("*")(no_nul)


class Limits(Strict):
    # The upper bounds are the operator's ceilings (core/limits.py): a 422 naming the ceiling, not a 400.
    memory_mb: int = Field(DEFAULT_LIMITS["memory_mb"], ge=128, description="at most CCD_MAX_MEMORY_MB")
    cpus: float = Field(DEFAULT_LIMITS["cpus"], gt=0, allow_inf_nan=False, description="at most CCD_MAX_CPUS")
    pids: int = Field(DEFAULT_LIMITS["pids"], ge=32, description="at most CCD_MAX_PIDS")
    disk_mb: int | None = Field(None, ge=MIN_DISK_MB, validate_default=True,
                                description="the workspace and home volumes together, in MB (default "
                                            "CCD_DISK_MB_DEFAULT, at most CCD_MAX_DISK_MB)")

    @field_validator("disk_mb")
    @classmethod
    def _disk_default(cls, disk_mb: int | None) -> int:
        """The operator's default when not given (its ceiling is checked with the others, core/limits.py)."""
        if disk_mb is not None:
            return disk_mb
        settings = app_settings()
        return settings.disk_mb_default if settings else DEFAULT_DISK_MB


class Timeouts(Strict):
    turn_seconds: int | None = Field(None, ge=1, description="at most CCD_MAX_TURN_SECONDS "
                                                             "(default CONTAINER_TIMEOUT_DEFAULT)")
    idle_seconds: int | None = Field(None, ge=1,
                                     description="stop the container after this long without a turn "
                                                 "(default CONTAINER_TIMEOUT_DEFAULT, at most CCD_MAX_IDLE_SECONDS)")


class SessionConfig(Strict):
    model: str | None = Field(None, min_length=1, max_length=200)
    append_system_prompt: str | None = Field(None, max_length=100_000)
    allowed_tools: list[str] | None = Field(None, max_length=100)
    # The container is the sandbox, so by default the agent may use its tools without asking.
    permission_mode: PERMISSION_MODES = "bypassPermissions"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    max_budget_usd: float | None = Field(None, ge=0, le=1_000_000,
                                         description="on a root session: the whole spawn tree's cost limit")
    # Who answers Claude Code's permission prompts: nobody (the container is the sandbox), or the API.
    approvals: Literal["none", "ask"] = "none"
    approval_rules: list[str] | None = Field(None, max_length=100,
                                             description="with approvals ask: Claude Code permission rules "
                                                         "(Bash(git *), Edit) that are allowed without asking")
    approval_timeout_seconds: int | None = Field(None, ge=1, le=86400,
                                                 description="a prompt nobody answers is denied after this "
                                                             "(default CCD_APPROVAL_TIMEOUT_SECONDS)")

    @field_validator("allowed_tools", "approval_rules")
    @classmethod
    def _tool_names(cls, tools: list[str] | None) -> list[str] | None:
        for tool in tools or []:
            if not tool or len(tool) > 200 or "," in tool:
                raise ValueError("each tool is a non-empty name without commas, at most 200 characters")
        return tools


WORKSPACE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Workspace(Strict):
    """ephemeral: lives and dies with the session; persistent: saved under `name` on stop, restored on start."""
    type: Literal["ephemeral", "persistent"] = "ephemeral"
    name: str | None = Field(None, pattern=WORKSPACE_NAME)

    @model_validator(mode="after")
    def _named_when_persistent(self) -> "Workspace":
        if (self.type == "persistent") != (self.name is not None):
            raise ValueError("a persistent workspace needs a name; an ephemeral one takes none")
        return self

    def stored(self) -> dict:
        return self.model_dump(exclude_none=True)


class CreateSession(Strict):
    workspace: Workspace = Field(default_factory=Workspace)
    config: SessionConfig = Field(default_factory=SessionConfig)


class SpawnRequest(Strict):
    prompt: str | None = Field(None, min_length=1, description="at most CCD_MAX_PROMPT_CHARS characters")
    config: dict[str, Any] = Field(default_factory=dict, description="keys that replace the parent's config")
    workspace: Workspace = Field(default_factory=Workspace)

    _prompt = field_validator("prompt")(lambda p: p if p is None else check_prompt(p))

    def config_overrides(self) -> dict:
        """Only the keys the request gave, validated."""
        spec = SessionConfig.model_validate(self.config)
        return spec.model_dump(include=spec.model_fields_set)


class ChildrenQuery(Strict):
    recursive: bool = False


class TurnQuery(Strict):
    wait: int | None = Field(None, ge=0, description="hold the request until the turn ends, up to this many "
                                                     "seconds (capped by CCD_MAX_WAIT_SECONDS)")


Prompt = Field(min_length=1, description="at most CCD_MAX_PROMPT_CHARS characters")
Webhook = Field(None, min_length=1, max_length=2000, description="POSTed the final resource when it ends")


DEFAULT_MAX_PROMPT_CHARS = 500_000


class PromptTooLong(TooLarge):
    code = "prompt_too_long"


def max_prompt_chars() -> int:
    """CCD_MAX_PROMPT_CHARS of the app serving this request (the default outside one)."""
    settings = app_settings()
    return settings.max_prompt_chars if settings else DEFAULT_MAX_PROMPT_CHARS


def check_prompt(prompt: str) -> str:
    """Not blank, and within the limit. Over it is a 413, not a validation error: pydantic lets a
    non-ValueError through, so every caller (chat, spawn, batch items, the WebSocket) answers the same."""
    if not prompt.strip():
        raise ValueError("prompt is blank")
    limit = max_prompt_chars()
    if len(prompt) > limit:
        raise PromptTooLong(f"the prompt has {len(prompt)} characters, more than CCD_MAX_PROMPT_CHARS ({limit})",
                            field="prompt")
    return prompt


class ChatRequest(Strict):
    prompt: str = Prompt
    wait: int | None = Field(None, ge=0, description="hold the request up to this many seconds "
                                                      "(capped by CCD_MAX_WAIT_SECONDS)")
    stream: bool = False
    webhook: str | None = Webhook

    _prompt = field_validator("prompt")(check_prompt)


class ApprovalAnswer(Strict):
    """The owner's answer to a permission prompt. updated_input and remember go with allow only (a 422
    `invalid_answer` with deny), checked in core/approvals.py so the WebSocket's answers get the same rule."""
    behavior: Literal["allow", "deny"]
    updated_input: dict[str, Any] | None = Field(None, description="allow: run the tool with this input instead")
    message: str | None = Field(None, max_length=10_000, description="deny: what the model is told")
    remember: bool = Field(False, description="allow: also allow what the prompt suggested (or the tool) for the "
                                              "rest of the session")


class BatchItemSpec(Strict):
    prompt: str = Prompt
    session_id: uuid.UUID | None = None
    config: SessionConfig | None = None
    custom_id: str | None = Field(None, min_length=1, max_length=255)

    _prompt = field_validator("prompt")(check_prompt)

    @model_validator(mode="after")
    def _one_target(self) -> "BatchItemSpec":
        if (self.session_id is None) == (self.config is None):
            raise ValueError("give either session_id (an existing session) or config (a new session)")
        return self


MAX_BATCH_ITEMS = 10_000


class BatchOptions(Strict):
    # Up to the batch size: one batch may have every item queued at once (owner limits still apply).
    concurrency: int = Field(4, ge=1, le=MAX_BATCH_ITEMS)
    webhook: str | None = Webhook


class CreateBatch(BatchOptions):
    # The count is checked by the route (413 too_many_items), not here (400), like every other limit.
    items: list[dict[str, Any]] = Field(min_length=1, description=f"at most {MAX_BATCH_ITEMS} items")


class EventsQuery(Strict):
    since: str | None = Field(None, max_length=8000)
    tree: bool = False
    limit: int = Field(100, ge=1, le=1000)
    token: str | None = None


MAX_OFFSET = 2**31 - 1  # past Postgres' bigint an OFFSET is a database error (fuzzing found it)


class PageQuery(Strict):
    limit: int = Field(50, ge=1, le=200)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)


class SessionListQuery(PageQuery):
    status: Literal["creating", "ready", "busy", "stopping", "stopped", "failed", "deleted"] | None = None


class ResultsQuery(Strict):
    follow: bool = False
    token: str | None = None
