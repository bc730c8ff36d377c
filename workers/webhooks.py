"""Webhook delivery: claim an attempt and commit, POST the finished turn or batch (or a turn's approval request)
signed to the vetted address (no redirect followed), record what came of it, and send the next attempt with backoff
until it lands."""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, update
from urllib3.exceptions import HTTPError

from core import approvals
from core import batches as batch_cmds
from core import netguard
from core.db import transaction
from core.errors import ValidationFailed
from core.models import Approval, Batch, Turn
from core.resources import batch_body, turn_body
from core.webhooks import SIGNATURE_HEADER, sign, target
from workers.context import ServiceContext

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10  # to connect, and for each read
DEADLINE_SECONDS = 30  # for the whole request, answer included (a receiver may trickle its answer)
# Longer than a POST may take, so a live claim is not taken over; a claim older than this belongs to a worker
# that died mid-attempt, and a redelivered task may make that attempt again.
CLAIM_SECONDS = 60
MAX_BACKOFF_SECONDS = 300
# What each kind of delivery is about: its row (which holds the claim), and the event its CCD-Event header names.
MODELS = {"turn": Turn, "batch": Batch, "approval": Approval}
EVENTS = {"turn": "turn.finished", "batch": "batch.finished", "approval": "approval.requested"}
Delivered = Turn | Batch | Approval
ANSWER_BYTES = 1024  # what is read of the receiver's answer: only its status matters


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: 1, 2, 4, ... capped at five minutes."""
    return float(min(2 ** (attempt - 1), MAX_BACKOFF_SECONDS))


def deliver(ctx: ServiceContext, kind: str, resource_id: str, attempt: int) -> str:
    """Attempt number `attempt`, made by the task that claims it (a duplicate task, or a stale one, skips). No row
    lock is held while the request is out: the claim is committed first, and the outcome fenced by it."""
    model = MODELS[kind]
    claim = _claim(ctx, model, resource_id, attempt)
    if claim is None:
        return "skipped"
    url, payload, claimed_until = claim
    outcome = _post(ctx, kind, url, payload, resource_id, attempt)
    if outcome == "retry" and attempt >= ctx.settings.webhook_max_attempts:
        outcome = "failed"
    with transaction(ctx.db) as db:
        mine = db.execute(update(model).where(
            model.id == uuid.UUID(resource_id), model.webhook_status == "pending", model.webhook_attempts == attempt,
            model.webhook_claimed_until == claimed_until,
        ).values(webhook_claimed_until=None, **({} if outcome == "retry" else {"webhook_status": outcome}))
            .execution_options(synchronize_session=False)).rowcount == 1
    if not mine:  # another worker took this attempt over; what comes next is its to decide
        log.warning("webhook for %s %s: attempt %d was taken over before it ended", kind, resource_id, attempt)
        return "skipped"
    if outcome == "retry":
        ctx.sender.deliver_webhook(kind, resource_id, attempt + 1, backoff(attempt))
    return outcome


def _claim(ctx: ServiceContext, model: type[Delivered], resource_id: str,
           attempt: int) -> tuple[str, bytes, datetime] | None:
    """Counts attempt `attempt` as made and commits: the URL, the body, and the claim's expiry (its fence), or None
    when the attempt is not this task's to make (it or a later one made already, one under way, or settled)."""
    now = func.now()
    with transaction(ctx.db) as db:
        claimed = db.execute(update(model).where(
            model.id == uuid.UUID(resource_id), model.webhook.is_not(None), model.webhook_status == "pending",
            # A later attempt than any made, with none under way (later, not only next: a retry sent by a version
            # that kept no count finds 0 here), or the same attempt again when the worker making it died.
            or_(and_(model.webhook_attempts < attempt,
                     or_(model.webhook_claimed_until.is_(None), model.webhook_claimed_until < now)),
                and_(model.webhook_attempts == attempt, model.webhook_claimed_until < now)),
        ).values(webhook_attempts=attempt, webhook_claimed_until=now + timedelta(seconds=CLAIM_SECONDS))
            .returning(model.webhook_claimed_until).execution_options(synchronize_session=False)).scalar()
        if claimed is None:
            return None
        row = db.get(model, uuid.UUID(resource_id))
        return row.webhook, json.dumps(payload(db, row), separators=(",", ":")).encode(), claimed


def payload(db, row: Delivered) -> dict:
    """The body a delivery posts: the turn, the batch, or the approval request with its turn and session."""
    if isinstance(row, Turn):
        return turn_body(row)
    if isinstance(row, Approval):
        return approvals.webhook_body(row)
    return batch_body(row, batch_cmds.counts(db, row.id))


def _post(ctx: ServiceContext, kind: str, url: str, payload: bytes, resource_id: str, attempt: int) -> str:
    """delivered, retry, or failed (the address is not allowed, so retrying cannot help)."""
    try:
        parts, vetted = target(url, ctx.settings.webhook_allow_private)
    except ValidationFailed as exc:
        log.warning("webhook for %s %s not sent (attempt %d): %s", kind, resource_id, attempt, exc.message)
        # The URL passed this check when it was accepted: now it either resolves somewhere refused, or did not
        # resolve at all this time (DNS fails and recovers), which another attempt may get past.
        return "failed" if exc.code == "webhook_not_allowed" else "retry"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": "cc-docker-webhook",
               SIGNATURE_HEADER: sign(ctx.settings.webhook_secret, payload),
               "CCD-Event": EVENTS[kind], "CCD-Delivery": resource_id, "CCD-Attempt": str(attempt)}
    http = netguard.pool(parts.scheme, vetted, TIMEOUT_SECONDS)
    try:
        with netguard.deadline(http, DEADLINE_SECONDS):
            # No redirect is followed: the signature goes to the vetted host and nowhere else.
            response = http.urlopen("POST", path, body=payload, headers=headers, redirect=False, retries=False,
                                    preload_content=False)
            response.read(ANSWER_BYTES)
    except (HTTPError, OSError) as exc:
        log.warning("webhook for %s %s failed (attempt %d): %s", kind, resource_id, attempt, exc)
        return "retry"
    finally:
        http.close()
    if 200 <= response.status < 300:
        log.info("webhook for %s %s delivered (attempt %d)", kind, resource_id, attempt)
        return "delivered"
    log.warning("webhook for %s %s answered %d (attempt %d)%s", kind, resource_id, response.status, attempt,
                ": a redirect, not followed" if 300 <= response.status < 400 else "")
    return "retry"
