"""Task names, queue routing and the Celery configuration shared by web (sender) and workers."""
from __future__ import annotations

from celery import Celery

from core.settings import Settings

START_SESSION = "ccd.start_session"
RUN_TURN = "ccd.run_turn"
STOP_SESSION = "ccd.stop_session"
DELETE_SESSION = "ccd.delete_session"
REAP = "ccd.reap"
DELIVER_WEBHOOK = "ccd.deliver_webhook"
STOP_IDLE = "ccd.stop_idle_sessions"
WORKSPACE_FILES = "ccd.workspace_files"
CHECK_CONTAINERS = "ccd.check_containers"
PROBE = "ccd.probe"


def celery_config(settings: Settings) -> dict:
    """Celery settings for long turns: ack late, prefetch one, no results, long visibility."""
    visibility = settings.visibility_timeout_seconds or settings.container_timeout_default * 2 + 600
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # A turn may run up to the container timeout; Redis should not redeliver it before
            # (a redelivery is harmless, the turn's lease decides who runs it, but it is wasted work).
            "visibility_timeout": visibility,
            "global_keyprefix": f"{settings.key_prefix}:celery:",
            # Sweep for unacknowledged tasks to hand out again at a pace that matches the timeout
            # (kombu's default sweep runs about every 100 s).
            "unacked_restore_interval": max(1, min(10, visibility // 4)),
            "unacked_restore_throttle": 1,
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.placement_queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # Task events (sent, received, started, succeeded, ...) for Flower and `celery events`: see README.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": {
            "reap": {"task": REAP, "schedule": float(settings.reap_seconds),
                     "options": {"queue": settings.placement_queue, "expires": settings.reap_seconds}},
            "stop-idle": {"task": STOP_IDLE, "schedule": float(settings.idle_check_seconds),
                          "options": {"queue": settings.placement_queue, "expires": settings.idle_check_seconds}},
        },
    }


def make_celery(settings: Settings, main: str = "ccd") -> Celery:
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


class TaskSender:
    """Sends tasks by name to the right queue; the web tier's only way to reach workers."""

    def __init__(self, settings: Settings, celery: Celery | None = None) -> None:
        self.settings = settings
        self.celery = celery or make_celery(settings)

    def start_session(self, session_id: str) -> None:
        self.celery.send_task(START_SESSION, args=[session_id], queue=self.settings.placement_queue)

    def run_turn(self, turn_id: str, host_queue: str) -> None:
        self.celery.send_task(RUN_TURN, args=[turn_id], queue=host_queue)

    def stop_session(self, session_id: str, host_queue: str | None) -> None:
        self.celery.send_task(STOP_SESSION, args=[session_id],
                              queue=host_queue or self.settings.placement_queue)

    def deliver_webhook(self, kind: str, resource_id: str, attempt: int = 1, countdown: float = 0) -> None:
        """Posts a finished turn's or batch's webhook (kind "turn" or "batch"); any worker may."""
        self.celery.send_task(DELIVER_WEBHOOK, args=[kind, resource_id, attempt],
                              queue=self.settings.placement_queue, countdown=countdown or None)

    def workspace_files(self, request: dict, host_queue: str) -> None:
        """Asks the session's host to read or write its workspace files (see workers/files.py)."""
        self.celery.send_task(WORKSPACE_FILES, args=[request], queue=host_queue,
                              expires=self.settings.files_timeout_seconds)

    def check_containers(self, host_queue: str) -> None:
        """Asks one host to settle its containers against the sessions table; stale checks are dropped."""
        self.celery.send_task(CHECK_CONTAINERS, queue=host_queue, expires=self.settings.reap_seconds * 4)

    def delete_session(self, session_id: str, host_queue: str | None) -> None:
        self.celery.send_task(DELETE_SESSION, args=[session_id],
                              queue=host_queue or self.settings.placement_queue)
