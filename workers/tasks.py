"""Celery tasks: thin wrappers that hand ids to the lifecycle, turn runner and reaper."""
from __future__ import annotations

import time

from celery import Celery

from core import queues
from core.logs import traced
from workers import containers, files, lifecycle
from workers.context import WorkerContext
from workers.pool import WarmPool
from workers.reaper import reap
from workers.turn_runner import TurnRunner


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Binds every task name to its work. Each task is safe to receive twice."""

    @app.task(name=queues.START_SESSION)
    def start_session(session_id: str, spec: dict | None = None) -> None:
        with traced(session_id=session_id):
            lifecycle.start_session(ctx, session_id, spec)

    @app.task(name=queues.RUN_TURN)
    def run_turn(turn_id: str) -> None:
        with traced(turn_id=turn_id):  # the runner adds the session's id once it has the turn
            TurnRunner(ctx).run(turn_id)

    @app.task(name=queues.STOP_SESSION)
    def stop_session(session_id: str, reason: str | None = None) -> None:
        with traced(session_id=session_id):
            lifecycle.stop_session(ctx, session_id, reason)

    @app.task(name=queues.DELETE_SESSION)
    def delete_session(session_id: str) -> None:
        with traced(session_id=session_id):
            lifecycle.delete_session(ctx, session_id)

    @app.task(name=queues.DELIVER_WEBHOOK)
    def deliver_webhook(kind: str, resource_id: str, attempt: int = 1) -> None:
        """Sent to the placement queue by an older version: handed on to the webhook consumer, which delivers
        (this process holds the Docker socket, so it makes no outbound request of a tenant's choosing)."""
        ctx.sender.deliver_webhook(kind, resource_id, attempt)

    @app.task(name=queues.STOP_IDLE)
    def stop_idle_sessions() -> int:
        with traced():
            return lifecycle.stop_idle_sessions(ctx)

    @app.task(name=queues.WORKSPACE_FILES)
    def workspace_files(request: dict) -> None:
        with traced(session_id=request.get("session_id")):
            files.serve(ctx, request)

    @app.task(name=queues.CHECK_CONTAINERS)
    def check_containers() -> dict:
        with traced():
            return containers.check(ctx)

    @app.task(name=queues.PROBE)
    def probe(key: str) -> None:
        """Records when it started in a Redis list the sender waits on: how long dispatch takes (make bench)."""
        ctx.events.redis.rpush(key, repr(time.time()))
        ctx.events.redis.expire(key, 300)

    @app.task(name=queues.FILL_POOL)
    def fill_pool(startup: bool = False) -> int:
        with traced():
            return WarmPool.of(ctx).fill(startup=startup)

    @app.task(name=queues.REAP)
    def reap_task() -> dict:
        with traced():
            return reap(ctx)
