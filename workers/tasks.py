"""Celery tasks: thin wrappers that hand ids to the lifecycle, turn runner and reaper."""
from __future__ import annotations

from celery import Celery

from core import queues
from workers import containers, files, lifecycle
from workers.context import WorkerContext
from workers.reaper import reap
from workers.turn_runner import TurnRunner
from workers.webhooks import deliver


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Binds every task name to its work. Each task is safe to receive twice."""

    @app.task(name=queues.START_SESSION)
    def start_session(session_id: str) -> None:
        lifecycle.start_session(ctx, session_id)

    @app.task(name=queues.RUN_TURN)
    def run_turn(turn_id: str) -> None:
        TurnRunner(ctx).run(turn_id)

    @app.task(name=queues.STOP_SESSION)
    def stop_session(session_id: str) -> None:
        lifecycle.stop_session(ctx, session_id)

    @app.task(name=queues.DELETE_SESSION)
    def delete_session(session_id: str) -> None:
        lifecycle.delete_session(ctx, session_id)

    @app.task(name=queues.DELIVER_WEBHOOK)
    def deliver_webhook(kind: str, resource_id: str, attempt: int = 1) -> str:
        return deliver(ctx, kind, resource_id, attempt)

    @app.task(name=queues.STOP_IDLE)
    def stop_idle_sessions() -> int:
        return lifecycle.stop_idle_sessions(ctx)

    @app.task(name=queues.WORKSPACE_FILES)
    def workspace_files(request: dict) -> None:
        files.serve(ctx, request)

    @app.task(name=queues.CHECK_CONTAINERS)
    def check_containers() -> dict:
        return containers.check(ctx)

    @app.task(name=queues.REAP)
    def reap_task() -> dict:
        return reap(ctx)
