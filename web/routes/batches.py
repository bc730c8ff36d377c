"""Batch routes: submit many prompts (JSON or NDJSON), follow progress, stream results, cancel."""
from __future__ import annotations

import json
import time
from datetime import timedelta

from flask import Response, g, make_response, request
from pydantic import ValidationError
from sqlalchemy import func, select

from core import admission, limits
from core import batches as batch_cmds
from core.db import transaction
from core.errors import TooLarge, ValidationFailed
from core.models import Batch
from core.resources import batch_body
from core.settings import Settings
from core.webhooks import check_enabled, check_url
from web.api import (api, body_bytes, claim_idempotency_key, enqueue, json_data, page, query,
                     remember_idempotency_key)
from web.auth import refuse_agent_webhook
from web.context import ctx, unit_of_work
from web.schemas import (MAX_BATCH_ITEMS, BatchItemSpec, BatchOptions, CreateBatch, PageQuery,
                         PromptTooLong, ResultsQuery)

FOLLOW_POLL_SECONDS = 0.5
# Items settle in transactions that commit in any order: a follower looks back this far.
SETTLE_SLACK = timedelta(seconds=30)


def read_submission() -> tuple[list, BatchOptions]:
    """The items and options of a batch: a JSON object {items, concurrency, webhook}, a bare JSON
    array, or NDJSON (one item per line); options of the latter two come from the query string."""
    request.max_content_length = ctx().settings.max_batch_bytes
    if request.mimetype in ("application/x-ndjson", "application/jsonl"):
        items = []
        for number, line in enumerate(body_bytes().decode("utf-8", "replace").splitlines()):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError:
                raise ValidationFailed(f"line {number + 1} of the NDJSON body is not JSON", code="invalid_json",
                                       field=f"items[{len(items)}]") from None
        return items, query(BatchOptions)
    data = json_data()
    if isinstance(data, list):
        return data, query(BatchOptions)
    if not isinstance(data, dict):
        raise ValidationFailed("send a JSON object with items, a JSON array, or NDJSON", code="invalid_json")
    spec = CreateBatch.model_validate(data)
    return spec.items, BatchOptions(concurrency=spec.concurrency, webhook=spec.webhook)


def validate_items(raw: list, settings: Settings) -> list[dict]:
    """Every item checked before anything is stored; the first bad one rejects the batch."""
    if not raw:
        raise ValidationFailed("a batch needs at least one item", field="items")
    if len(raw) > MAX_BATCH_ITEMS:
        raise TooLarge(f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(raw)}", code="too_many_items",
                       field="items")
    items = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidItem(index, "", "each item must be a JSON object")
        try:
            spec = BatchItemSpec.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidItem(index, ".".join(str(p) for p in first["loc"]), first["msg"]) from None
        except PromptTooLong as exc:
            exc.field = f"items[{index}].{exc.field}"
            raise
        config = spec.config.model_dump() if spec.config else None
        if config is not None:
            limits.check_ceilings(config, settings, prefix=f"items[{index}].config.")
        items.append({"prompt": spec.prompt, "custom_id": spec.custom_id, "session_id": spec.session_id,
                      "config": config})
    return items


class InvalidItem(ValidationFailed):
    code = "invalid_item"

    def __init__(self, index: int, where: str, reason: str) -> None:
        field = f"items[{index}]" + (f".{where}" if where else "")
        super().__init__(f"item {index}: {where + ': ' if where else ''}{reason}", field=field)


@api.post("/batches")
def create_batch():
    """Stores every item (all validated first), answers 202 at once, and starts the first ones."""
    raw, options = read_submission()
    items = validate_items(raw, ctx().settings)
    refuse_agent_webhook(g.claims, options.webhook)  # batches are the owner's already; this says why too
    if options.webhook:
        check_enabled(ctx().settings.webhooks_enabled)
        check_url(options.webhook, ctx().settings.webhook_allow_private)
    with unit_of_work() as db:
        prior = claim_idempotency_key(db)
        if prior is not None:
            row = batch_cmds.get_owned(db, g.owner, str(prior.resource_id))
            return batch_body(row, batch_cmds.counts(db, row.id)), prior.status_code
        batch_cmds.check_sessions(db, g.owner, items)
        admission.admit_pending_items(db, g.owner, ctx().settings, len(items))
        row = batch_cmds.create_batch(db, g.owner, items, options.concurrency, options.webhook)
        remember_idempotency_key(db, "batch", row.id, 202)
        batch_id = row.id
    c, plan = ctx(), batch_cmds.Dispatch()
    enqueue(batch_cmds.decide, c.db, c.events, c.settings, [batch_id], plan)  # the reaper starts it if this fails
    with unit_of_work() as db:
        row = batch_cmds.get_owned(db, g.owner, str(batch_id))
        body = batch_body(row, batch_cmds.counts(db, row.id))
    response = make_response(body, 202, {"Location": body["links"]["self"]})
    # The released turns are committed: their tasks (one start per new session) go out once the answer has.
    response.call_on_close(lambda: enqueue(batch_cmds.carry_out, plan, c.events, c.sender, c.cancels))
    return response


@api.get("/batches")
def list_batches():
    q = query(PageQuery)
    with unit_of_work() as db:
        total = db.scalar(select(func.count()).select_from(Batch).where(Batch.owner == g.owner)) or 0
        rows = db.scalars(select(Batch).where(Batch.owner == g.owner).order_by(Batch.created_at.desc())
                          .limit(q.limit).offset(q.offset)).all()
        return page([batch_body(r, batch_cmds.counts(db, r.id)) for r in rows], total, q)


@api.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    with unit_of_work() as db:
        row = batch_cmds.get_owned(db, g.owner, batch_id)
        return batch_body(row, batch_cmds.counts(db, row.id))


@api.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancels every item that has not finished; running turns are interrupted."""
    plan = batch_cmds.Dispatch()
    with unit_of_work() as db:
        row = batch_cmds.get_owned(db, g.owner, batch_id, lock=True)
        batch_cmds.cancel(db, row, plan)
        row_id = row.id
    c = ctx()
    enqueue(batch_cmds.carry_out, plan, c.events, c.sender, c.cancels)
    enqueue(c.advance_batches, [row_id])  # settles the turns cancelled above
    with unit_of_work() as db:
        row = batch_cmds.get_owned(db, g.owner, batch_id)
        return batch_body(row, batch_cmds.counts(db, row.id)), 202


def result_line(item, turn) -> str:
    return json.dumps({
        "index": item.index, "custom_id": item.custom_id,
        "session_id": str(item.session_id) if item.session_id else None,
        "turn_id": str(item.turn_id) if item.turn_id else None, "status": item.status,
        "result": turn.result if turn else None, "usage": turn.usage if turn else None,
        "cost_usd": float(turn.cost_usd) if turn is not None else None,
        "reported_cost_usd": float(turn.reported_cost_usd) if turn is not None and turn.reported_cost_usd is not None
        else None,
        "duration_ms": turn.duration_ms if turn else None, "error": item.error,
    }, separators=(",", ":")) + "\n"


@api.get("/batches/<batch_id>/results")
def batch_results(batch_id: str):
    """NDJSON, one line per finished item in the order they finished; `follow=true` keeps the
    response open until the batch has ended, sending each item as it finishes."""
    q = query(ResultsQuery)
    with unit_of_work() as db:
        row = batch_cmds.get_owned(db, g.owner, batch_id)
        bid = row.id
    db_factory = ctx().db

    def lines():
        sent: set[int] = set()
        look_from = None
        while True:
            with transaction(db_factory) as db:
                running = db.get(Batch, bid).status == "running"
                rows = batch_cmds.results(db, bid, look_from)
                unsettled = batch_cmds.counts(db, bid)
            for item, turn in rows:
                if item.index not in sent:
                    sent.add(item.index)
                    yield result_line(item, turn)
            if rows:
                look_from = rows[-1][0].finished_at - SETTLE_SLACK
            busy = running or unsettled["queued"] or unsettled["running"]
            if not q.follow or not busy:
                return
            time.sleep(FOLLOW_POLL_SECONDS)

    return Response(lines(), 200, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    mimetype="application/x-ndjson")
