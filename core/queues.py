"""Task names, queue routing and the Celery configuration shared by web (sender) and workers."""
from __future__ import annotations

import time

from celery import Celery
from kombu.utils.uuid import uuid

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
FILL_POOL = "ccd.fill_pool"
PROBE = "ccd.probe"
# Tasks per Redis pipeline when sending many (each is an LPUSH, and a PUBLISH for its task-sent event).
SEND_BATCH = 100


def celery_config(settings: Settings) -> dict:
    """Celery settings for long turns: ack late, prefetch one, no results, long visibility."""
    visibility = settings.visibility_timeout_seconds or settings.turn_ceiling * 2 + 600
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

    def start_session(self, session_id: str, spec: dict | None = None) -> None:
        """Asks a worker to make the session's container; `spec` (see workers.lifecycle.start_session) saves it
        reading the session first."""
        self.celery.send_task(START_SESSION, args=[session_id] + ([spec] if spec else []),
                              queue=self.settings.placement_queue)

    def run_turn(self, turn_id: str, host_queue: str) -> None:
        self.celery.send_task(RUN_TURN, args=[turn_id], queue=host_queue)

    def start_sessions(self, session_ids: list[str]) -> None:
        """start_session for many sessions, pipelined (see send_many)."""
        self.send_many([(START_SESSION, [sid], self.settings.placement_queue) for sid in session_ids])

    def run_turns(self, pairs: list[tuple[str, str]]) -> None:
        """run_turn for many (turn id, host queue) pairs, pipelined (see send_many)."""
        self.send_many([(RUN_TURN, [turn_id], host_queue) for turn_id, host_queue in pairs])

    def send_many(self, tasks: list[tuple[str, list, str]]) -> None:
        """Sends (task name, args, queue) tasks as the Celery messages `send_task` makes (task-sent events
        too) through one pooled producer, SEND_BATCH per Redis pipeline instead of a round trip each, and
        without send_task's per-call routing. A failed flush raises with delivery uncertain: the reaper
        re-sends what never arrived (a task may then come twice, which tasks allow)."""
        if not tasks:
            return  # the reaper's usual sweep: nothing to send, no producer to take
        declared: set[str] = set()
        with self.celery.producer_or_acquire() as producer:
            for start in range(0, len(tasks), SEND_BATCH):
                with producer.batch(max_size=SEND_BATCH * 2):  # an LPUSH and a PUBLISH each; flushed on exit
                    for name, args, queue in tasks[start:start + SEND_BATCH]:
                        self._publish(producer, name, args, queue, declare=queue not in declared)
                        declared.add(queue)
                time.sleep(0)  # under gevent: the web worker's other requests run between batches

    def _publish(self, producer, name: str, args: list, queue: str, declare: bool) -> None:
        """One task message onto a producer (batched by the caller), declaring its queue when asked."""
        app = self.celery
        message = app.amqp.create_task_message(uuid(), name, args, {}, reply_to=app.thread_oid,
                                               create_sent_event=app.conf.task_send_sent_event, ignore_result=None)
        # A buffered publish cannot fail, so retrying it is moot: the flush is what fails.
        app.amqp.send_task_message(producer, name, message, queue=queue, retry=False,
                                   declare=None if declare else [])

    def stop_session(self, session_id: str, host_queue: str | None, reason: str | None = None) -> None:
        """Asks the session's host to stop it; `reason` when the service stopped it (e.g. disk_quota)."""
        self.celery.send_task(STOP_SESSION, args=[session_id] + ([reason] if reason else []),
                              queue=host_queue or self.settings.placement_queue)

    def deliver_webhook(self, kind: str, resource_id: str, attempt: int = 1, countdown: float = 0) -> None:
        """Posts a webhook from the webhook consumer: a finished turn's or batch's (kind "turn" or "batch"), or a
        turn's approval request (kind "approval", the approval's id)."""
        self.celery.send_task(DELIVER_WEBHOOK, args=[kind, resource_id, attempt],
                              queue=self.settings.webhook_queue, countdown=countdown or None)

    def workspace_files(self, request: dict, host_queue: str) -> None:
        """Asks the session's host to read or write its workspace files (see workers/files.py)."""
        self.celery.send_task(WORKSPACE_FILES, args=[request], queue=host_queue,
                              expires=self.settings.files_timeout_seconds)

    def check_containers(self, host_queue: str) -> None:
        """Asks one host to settle its containers against the sessions table; stale checks are dropped."""
        self.celery.send_task(CHECK_CONTAINERS, queue=host_queue, expires=self.settings.reap_seconds * 4)

    def fill_pool(self, host_queue: str, startup: bool = False) -> None:
        """Asks one host to clear out and top up its warm pool (`startup`: a worker's first, run even with the pool
        off, so that what an earlier worker left is cleared)."""
        self.celery.send_task(FILL_POOL, kwargs={"startup": startup}, queue=host_queue)

    def delete_session(self, session_id: str, host_queue: str | None) -> None:
        self.celery.send_task(DELETE_SESSION, args=[session_id],
                              queue=host_queue or self.settings.placement_queue)
