"""Webhook delivery: POST the finished turn or batch, signed, retried with backoff until it lands."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid

from core import batches as batch_cmds
from core.db import transaction
from core.errors import ValidationFailed
from core.models import Batch, Turn
from core.resources import batch_body, turn_body
from core.webhooks import SIGNATURE_HEADER, check_url, sign
from workers.context import WorkerContext

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10
MAX_BACKOFF_SECONDS = 300


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: 1, 2, 4, ... capped at five minutes."""
    return float(min(2 ** (attempt - 1), MAX_BACKOFF_SECONDS))


def deliver(ctx: WorkerContext, kind: str, resource_id: str, attempt: int) -> str:
    """One delivery attempt; the row lock makes a concurrent attempt for the same resource skip."""
    model = Turn if kind == "turn" else Batch
    with transaction(ctx.db) as db:
        row = db.get(model, uuid.UUID(resource_id), with_for_update={"skip_locked": True})
        if row is None or not row.webhook or row.webhook_status != "pending":
            return "skipped"
        body = turn_body(row) if kind == "turn" else batch_body(row, batch_cmds.counts(db, row.id))
        outcome = _post(ctx, kind, row.webhook, json.dumps(body, separators=(",", ":")).encode(), resource_id, attempt)
        if outcome == "retry" and attempt >= ctx.settings.webhook_max_attempts:
            outcome = "failed"
        if outcome != "retry":
            row.webhook_status = outcome
    if outcome == "retry":
        ctx.sender.deliver_webhook(kind, resource_id, attempt + 1, backoff(attempt))
    return outcome


def _post(ctx: WorkerContext, kind: str, url: str, payload: bytes, resource_id: str, attempt: int) -> str:
    """delivered, retry, or failed (the URL is not allowed, so retrying cannot help)."""
    try:
        check_url(url, ctx.settings.webhook_allow_private)
    except ValidationFailed as exc:
        log.warning("webhook for %s %s not sent: %s", kind, resource_id, exc.message)
        return "failed"
    request = urllib.request.Request(url, data=payload, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "cc-docker-webhook",
        SIGNATURE_HEADER: sign(ctx.settings.webhook_secret, payload),
        "CCD-Event": f"{kind}.finished", "CCD-Delivery": f"{resource_id}", "CCD-Attempt": str(attempt)})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            response.read(1024)
        log.info("webhook for %s %s delivered (attempt %d)", kind, resource_id, attempt)
        return "delivered"
    except (urllib.error.URLError, OSError) as exc:
        log.warning("webhook for %s %s failed (attempt %d): %s", kind, resource_id, attempt, exc)
        return "retry"
