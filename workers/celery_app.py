"""Builds the worker's Celery app from settings, with its tasks and per-process set-up."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from core.queues import make_celery
from core.settings import Settings
from workers.context import WorkerContext
from workers.tasks import register_tasks


def create_worker_app(settings: Settings) -> tuple[Celery, WorkerContext]:
    app = make_celery(settings, main="ccd-worker")
    ctx = WorkerContext(settings)
    register_tasks(app, ctx)

    @worker_process_init.connect(weak=False)
    def _fresh_connections(**_) -> None:
        ctx.reset_after_fork()

    @worker_ready.connect(weak=False)
    def _fill_warm_pool(**_) -> None:
        # Always, even with the pool off: the fill first clears what an earlier worker of this host left.
        ctx.sender.fill_pool(settings.host_queue(), startup=True)

    return app, ctx
