"""Figures read from Postgres and Redis at scrape time: turns and sessions by status, running containers,
Celery queue depth and the age of the oldest queued turn.

Two GROUP BY queries and one Redis pipeline per scrape. When Postgres or Redis does not answer, its figures
are left out and `ccd_dependency_up` says which one.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import redis
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from core.models import SESSION_STATUSES, TURN_STATUSES, Session, Turn
from core.settings import Settings

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue as one list per priority step: the name, then name + "\x06\x16" + step.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
# Sessions in these states have a container up (the worker started it and nothing has stopped it).
CONTAINER_UP = ("ready", "busy")


class StateCollector:
    """A prometheus-client collector over the service's own tables and queues; one per scrape."""

    def __init__(self, engine: Engine, client: redis.Redis, settings: Settings) -> None:
        self.engine, self.redis, self.settings = engine, client, settings

    def collect(self):
        up = GaugeMetricFamily("ccd_dependency_up", "1 when the dependency answered this scrape, else 0",
                               labels=["dependency"])
        try:
            turns, sessions = self._rows()
        except SQLAlchemyError as exc:
            log.warning("metrics: Postgres did not answer: %s", getattr(exc, "orig", None) or exc)
            turns, sessions = None, None
        up.add_metric(["postgres"], 0 if turns is None else 1)
        if turns is not None:
            yield from turn_families(turns)
            yield from session_families(sessions)
        queues = [self.settings.placement_queue, self.settings.webhook_queue] + sorted(
            {queue for status, queue, _ in sessions or () if queue and status != "deleted"})
        try:
            depths = self._depths(queues)
        except redis.RedisError as exc:
            log.warning("metrics: Redis did not answer: %s", exc)
            depths = None
        up.add_metric(["redis"], 0 if depths is None else 1)
        if depths is not None:
            depth = GaugeMetricFamily("ccd_queue_depth", "Celery messages waiting in a queue (the placement "
                                      "queue, the webhooks queue and each host's)", labels=["queue"])
            for queue, size in depths.items():
                depth.add_metric([queue], size)
            yield depth
        yield up

    def _rows(self) -> tuple[list, list]:
        with self.engine.connect() as conn:
            turns = conn.execute(select(Turn.status, func.count(), func.min(Turn.created_at))
                                 .group_by(Turn.status)).all()
            sessions = conn.execute(select(Session.status, Session.host_queue, func.count())
                                    .group_by(Session.status, Session.host_queue)).all()
        return turns, sessions

    def _depths(self, queues: list[str]) -> dict[str, int]:
        prefix = f"{self.settings.key_prefix}:celery:"
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            for suffix in PRIORITY_SUFFIXES:
                pipe.llen(prefix + queue + suffix)
        sizes = pipe.execute()
        step = len(PRIORITY_SUFFIXES)
        return {queue: sum(sizes[i * step:(i + 1) * step]) for i, queue in enumerate(queues)}


def turn_families(rows) -> list:
    """ccd_turns by status (every status, zero included) and the age of the oldest queued turn."""
    counts = {status: 0 for status in TURN_STATUSES}
    oldest_queued = None
    for status, count, oldest in rows:
        counts[status] = count
        if status == "queued":
            oldest_queued = oldest
    turns = GaugeMetricFamily("ccd_turns", "Turns in the database, by status", labels=["status"])
    for status, count in counts.items():
        turns.add_metric([status], count)
    age = (datetime.now(timezone.utc) - oldest_queued).total_seconds() if oldest_queued else 0.0
    oldest = GaugeMetricFamily("ccd_queue_oldest_age_seconds", "Age of the oldest turn still queued (0 when none "
                               "is): how long the longest wait has been so far")
    oldest.add_metric([], max(0.0, age))
    return [turns, oldest]


def session_families(rows) -> list:
    """ccd_sessions by status (every status, zero included) and ccd_containers_running by host queue."""
    counts = {status: 0 for status in SESSION_STATUSES}
    running: dict[str, int] = {}
    for status, queue, count in rows:
        counts[status] = counts.get(status, 0) + count
        if status in CONTAINER_UP and queue:
            running[queue] = running.get(queue, 0) + count
    sessions = GaugeMetricFamily("ccd_sessions", "Sessions in the database, by status", labels=["status"])
    for status, count in counts.items():
        sessions.add_metric([status], count)
    containers = GaugeMetricFamily("ccd_containers_running", "Session containers up (sessions ready or busy), by "
                                   "host queue", labels=["queue"])
    for queue, count in sorted(running.items()):
        containers.add_metric([queue], count)
    return [sessions, containers]
