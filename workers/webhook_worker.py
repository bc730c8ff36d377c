"""The webhook consumer (`python -m workers webhooks`): a Celery app with the delivery task alone, on the webhooks
queue, built from a context with no Docker client, so the process that POSTs to tenants' URLs has no Docker socket."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from core import queues
from core.logs import traced
from core.queues import make_celery
from core.settings import Settings
from workers.context import ServiceContext
from workers.webhooks import deliver


def create_webhook_app(settings: Settings) -> tuple[Celery, ServiceContext]:
    app = make_celery(settings, main="ccd-webhooks")
    ctx = ServiceContext(settings)

    @app.task(name=queues.DELIVER_WEBHOOK)
    def deliver_webhook(kind: str, resource_id: str, attempt: int = 1) -> str:
        with traced(turn_id=resource_id if kind == "turn" else None):
            return deliver(ctx, kind, resource_id, attempt)

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_) -> None:
        ctx.reset_after_fork()

    return app, ctx
