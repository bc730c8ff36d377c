"""Webhook delivery (workers/webhooks.py) against the real Postgres: the claim is committed before the POST, so no
row lock is held while the receiver keeps the request open, and two workers with the same delivery post it once."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select, text, update

from core.db import transaction
from core.queues import DELIVER_WEBHOOK
from core.models import Batch, Session, Turn, utcnow
from tests.conftest import wait_for
from tests.receiver import Receiver
from workers.context import ServiceContext
from workers.webhooks import deliver


@pytest.fixture
def ctx(api_settings):
    """What the webhook consumer delivers with; a retry it sends goes to a queue no worker of this run reads."""
    context = ServiceContext(api_settings)
    yield context
    context.engine.dispose()


@pytest.fixture
def receiver():
    """A receiver that holds each request open until the test releases it."""
    found = Receiver(hold=True)
    yield found
    found.stop()


def finished(ctx: ServiceContext, kind: str, url: str) -> str:
    """A finished turn (in a session of its own) or batch whose webhook is pending; its id."""
    with transaction(ctx.db) as db:
        if kind == "batch":
            row = Batch(owner="hooks", concurrency=1, total=0, status="completed", finished_at=utcnow(),
                        webhook=url, webhook_status="pending")
        else:
            session = Session(owner="hooks", status="ready")
            db.add(session)
            db.flush()
            row = Turn(session_id=session.id, seq=1, prompt="p", status="succeeded", result="done",
                       finished_at=utcnow(), webhook=url, webhook_status="pending")
        db.add(row)
        db.flush()
        return str(row.id)


def lock_now(settings, model, resource_id: str) -> bool:
    """Whether another transaction can lock the row at once (SELECT ... FOR UPDATE NOWAIT)."""
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '100ms'"))
            conn.execute(select(model.id).where(model.id == uuid.UUID(resource_id)).with_for_update(nowait=True))
            return True
    except Exception as exc:  # LockNotAvailable, as psycopg raises it
        assert "lock" in str(exc).lower(), exc
        return False
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind,model", [("turn", Turn), ("batch", Batch)])
def test_no_row_lock_is_held_while_the_receiver_holds_the_webhook_request_open(ctx, receiver, kind, model):
    resource_id = finished(ctx, kind, receiver.url)
    with ThreadPoolExecutor(1) as pool:
        delivery = pool.submit(deliver, ctx, kind, resource_id, 1)
        wait_for(lambda: receiver.calls, 10, what="the webhook request")
        assert lock_now(ctx.settings, model, resource_id), "the delivery holds the row locked during the POST"
        receiver.release.set()
        assert delivery.result(15) == "delivered"
    with transaction(ctx.db) as db:
        row = db.get(model, uuid.UUID(resource_id))
        assert (row.webhook_status, row.webhook_attempts, row.webhook_claimed_until) == ("delivered", 1, None)


def test_two_workers_running_the_same_delivery_task_post_it_once(ctx, receiver):
    resource_id = finished(ctx, "turn", receiver.url)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(deliver, ctx, "turn", resource_id, 1)
        wait_for(lambda: receiver.calls, 10, what="the webhook request")
        assert deliver(ctx, "turn", resource_id, 1) == "skipped"  # the same task, received twice
        assert deliver(ctx, "turn", resource_id, 2) == "skipped"  # the next attempt, while this one is out
        receiver.release.set()
        assert first.result(15) == "delivered"
    assert deliver(ctx, "turn", resource_id, 1) == "skipped"  # and after it landed
    time.sleep(0.5)
    assert receiver.header("CCD-Attempt") == ["1"]


def test_an_attempt_whose_worker_died_mid_request_is_made_again_by_the_redelivered_task(ctx, receiver):
    receiver.release.set()
    resource_id = finished(ctx, "turn", receiver.url)
    with transaction(ctx.db) as db:  # as a worker killed during its POST leaves the row
        db.execute(update(Turn).where(Turn.id == uuid.UUID(resource_id)).values(
            webhook_attempts=1, webhook_claimed_until=utcnow() + timedelta(seconds=30)))
    assert deliver(ctx, "turn", resource_id, 1) == "skipped"  # its claim still stands
    with transaction(ctx.db) as db:
        db.execute(update(Turn).where(Turn.id == uuid.UUID(resource_id)).values(
            webhook_claimed_until=utcnow() - timedelta(seconds=1)))
    assert deliver(ctx, "turn", resource_id, 1) == "delivered"
    assert receiver.header("CCD-Attempt") == ["1"]


def test_a_retry_sent_before_attempts_were_counted_is_made_and_an_older_or_repeated_attempt_is_not(ctx):
    failing = Receiver(500)
    try:
        resource_id = finished(ctx, "turn", failing.url)  # its count is 0, as the migration leaves a pending row
        assert deliver(ctx, "turn", resource_id, 3) == "retry"
        assert deliver(ctx, "turn", resource_id, 2) == "skipped"
        assert deliver(ctx, "turn", resource_id, 3) == "skipped"
        assert deliver(ctx, "turn", resource_id, 4) == "retry"
    finally:
        failing.stop()
    assert failing.header("CCD-Attempt") == ["3", "4"]


def test_a_redirect_is_a_failed_attempt_and_the_last_one_fails_the_webhook(ctx):
    """A 302 to another loopback port: that port never gets a request, and the final attempt ends `failed`."""
    elsewhere = Receiver()
    redirect = Receiver(302, location=elsewhere.url)
    two = replace(ctx.settings, webhook_max_attempts=2)
    ctx.settings = two
    try:
        resource_id = finished(ctx, "turn", redirect.url)
        assert deliver(ctx, "turn", resource_id, 1) == "retry"
        assert deliver(ctx, "turn", resource_id, 2) == "failed"
        assert deliver(ctx, "turn", resource_id, 3) == "skipped"
    finally:
        redirect.stop()
        elsewhere.stop()
    assert redirect.header("CCD-Attempt") == ["1", "2"] and elsewhere.calls == []
    with transaction(ctx.db) as db:
        assert db.get(Turn, uuid.UUID(resource_id)).webhook_status == "failed"


def test_the_webhook_consumer_has_only_the_delivery_task_and_loads_no_docker_client():
    """What `python -m workers webhooks` builds, in a fresh interpreter: the Docker SDK is never even imported."""
    probe = ("import sys; from core.settings import Settings; import workers.__main__; "
             "from workers.webhook_worker import create_webhook_app; "
             "app, ctx = create_webhook_app(Settings.from_env({'JWT_SECRET': 'x' * 32})); "
             "print(sorted(t for t in app.tasks if t.startswith('ccd.')), 'docker' in sys.modules, "
             "hasattr(ctx, 'runtime'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['ccd.deliver_webhook']", "False", "False"]


def test_a_delivery_task_left_on_the_placement_queue_is_handed_to_the_webhook_consumer(api_settings):
    """The main worker (which holds the Docker socket) makes no request for it: it re-sends it to the webhooks
    queue, where only the webhook consumer reads."""
    from tests.test_batch_intake import drain
    from workers.celery_app import create_worker_app

    drain(api_settings, api_settings.webhook_queue)
    app, ctx = create_worker_app(api_settings)
    resource_id = str(uuid.uuid4())
    app.tasks[DELIVER_WEBHOOK]("turn", resource_id, 3)
    assert [(m.headers["task"], m.payload[0]) for m in drain(api_settings, api_settings.webhook_queue)] == [
        (DELIVER_WEBHOOK, ["turn", resource_id, 3])]
