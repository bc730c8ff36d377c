"""Database tables: sessions and their turns (Postgres is the system of record for both)."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import (BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, Numeric, String,
                        Text, UniqueConstraint)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.turn_states import FINISHED_TURN_STATUSES, TurnStatus

SESSION_STATUSES = ("creating", "ready", "busy", "stopping", "stopped", "failed", "deleted")
TURN_STATUSES = tuple(TurnStatus)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Session(Base):
    """One Claude Code session: its container, its conversation and its running totals."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True)
    depth: Mapped[int] = mapped_column(Integer, default=0)
    # The top of the session's spawn tree (itself for a root): the tree budget and tree events use it.
    root_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="creating", index=True)
    config: Mapped[dict] = mapped_column(JSONB, default=dict)
    workspace: Mapped[dict] = mapped_column(JSONB, default=dict)
    container_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    host_queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    claude_session_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), default=uuid.uuid4)
    conversation_started: Mapped[bool] = mapped_column(default=False)
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 6), default=Decimal(0))  # metered at the model proxy
    # The hot Claude Code process the session's container last reported (its model credential names it).
    process_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    # Permission rules an owner's "remember" added to the session's approvals (Claude Code's rule syntax).
    approval_rules: Mapped[list] = mapped_column(JSONB, default=list, server_default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    last_active_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_sessions_owner_created", "owner", "created_at"),)


class Turn(Base):
    """One prompt sent to a session and what came of it; seq orders a session's turns."""

    __tablename__ = "turns"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    session_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sessions.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=TurnStatus.QUEUED)  # a TurnStatus
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    usage: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    # What the model proxy metered for the turn's requests (the spend budgets count), tokens by model, and the cost
    # Claude Code's result line reported (shown only: the agent can print its own result line).
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 6), default=Decimal(0), server_default="0")
    metered_usage: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    reported_cost_usd: Mapped[Decimal | None] = mapped_column(Numeric(14, 6), nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_event_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    queued_event_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    last_event_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A stable code for why a turn did not succeed: a core.turn_states.TurnReason (worker_lost, output_limit, ...).
    reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Set by a cancel request; the worker running the turn interrupts Claude Code when it sees it.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Delivery attempts claimed so far, and until when the latest claim holds (workers/webhooks.py).
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="SET NULL"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The process a credential minted for this turn names, should the turn start a new one (see the model proxy).
    process_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    # What the turn's resource shows: loaded with one query per turn, or per page with selectinload.
    pending_approvals: Mapped[list["Approval"]] = relationship(
        primaryjoin="and_(Turn.id == foreign(Approval.turn_id), Approval.status == 'pending')",
        order_by="Approval.created_at", viewonly=True, lazy="select")

    __table_args__ = (
        UniqueConstraint("session_id", "seq", name="uq_turns_session_seq"),
        Index("ix_turns_status_created", "status", "created_at"),
    )


BATCH_STATUSES = ("running", "completed", "cancelled")
ITEM_STATUSES = ("pending", "released") + FINISHED_TURN_STATUSES


class Batch(Base):
    """Many prompts submitted at once, run at most `concurrency` at a time."""

    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    concurrency: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Delivery attempts claimed so far, and until when the latest claim holds (workers/webhooks.py).
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BatchItem(Base):
    """One prompt of a batch: pending until released as a turn, then the turn's final status."""

    __tablename__ = "batch_items"

    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    session_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    config: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    turn_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_batch_items_batch_status", "batch_id", "status"),)


class IdempotencyKey(Base):
    """A POST that created something, remembered by its owner's key so a retry finds it again."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    resource_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Workspace(Base):
    """A named persistent workspace: its latest snapshot, and which session holds it now."""

    __tablename__ = "workspaces"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    # The conversation the snapshot's agent home holds, so a new session can resume it.
    claude_session_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    conversation_started: Mapped[bool] = mapped_column(default=False)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_key: Mapped[str | None] = mapped_column(String(400), nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    saved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Approval(Base):
    """One permission prompt of Claude Code's (a `can_use_tool` control request) and how it was answered."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("turn_id", "request_id"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    turn_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("turns.id", ondelete="CASCADE"))
    session_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    request_id: Mapped[str] = mapped_column(String(200))  # Claude Code's control request id
    tool_name: Mapped[str] = mapped_column(String(200))
    input: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    suggestions: Mapped[list | None] = mapped_column(JSONB, nullable=True)
    # pending, then allowed, denied, timed_out or cancelled (the turn ended first).
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # What the answer said: updated_input, message, remember, and who decided.
    decision: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The turn's webhook, when it has one, also gets the request (approval.requested): delivered and claimed as the
    # turn's is (workers/webhooks.py).
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
