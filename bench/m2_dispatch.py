"""M2: dispatch. Commit a row and send a task → the task starts on the worker, beside a raw Redis hand-off
(commit the same row, LPUSH, a waiting BLPOP takes it)."""
from __future__ import annotations

import queue
import threading
import time
import uuid

import redis
from sqlalchemy import func, update

from core.db import transaction
from core.models import Session
from core.queues import PROBE
from bench.stats import Figure, summary


def commit_row(bench, session_id: uuid.UUID) -> None:
    """The write a chat commits before it enqueues (here: the session's activity time)."""
    with transaction(bench.db) as db:
        db.execute(update(Session).where(Session.id == session_id).values(last_active_at=func.now()))


def celery_dispatch(bench, session_id: uuid.UUID, host_queue: str, n: int) -> list[float]:
    """Commit + send_task → the probe task's first line, in ms."""
    samples = []
    for _ in range(n):
        key = f"{bench.settings.key_prefix}:bench:probe:{uuid.uuid4().hex}"
        sent = time.time()
        commit_row(bench, session_id)
        bench.sender.celery.send_task(PROBE, args=[key], queue=host_queue)
        _key, started = bench.redis.blpop([key], timeout=30) or (None, None)
        if started is None:
            raise RuntimeError("the probe task did not start within 30 s; is the worker up?")
        samples.append((float(started) - sent) * 1000)
    return samples


def raw_handoff(bench, session_id: uuid.UUID, n: int) -> list[float]:
    """Commit + LPUSH → a BLPOP waiting in another thread, on its own connection, in ms."""
    key = f"{bench.settings.key_prefix}:bench:handoff"
    received: queue.Queue[float] = queue.Queue()
    consumer = redis.Redis.from_url(bench.settings.redis_url)

    def take() -> None:
        for _ in range(n):
            if consumer.blpop([key], timeout=30):
                received.put(time.time())

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    samples = []
    for _ in range(n):
        sent = time.time()
        commit_row(bench, session_id)
        bench.redis.lpush(key, "x")
        samples.append((received.get(timeout=30) - sent) * 1000)
    thread.join(5)
    return samples


def measure(bench, runs: int) -> Figure:
    session = bench.new_session()
    sid, host_queue = uuid.UUID(session["id"]), bench.settings.host_queue()
    celery_dispatch(bench, sid, host_queue, 5)  # warm the connections and the worker's processes
    raw_handoff(bench, sid, 5)
    ours, base = [], []
    for _ in range(max(1, runs // 50)):  # alternate in blocks so that both see the same noise
        ours += celery_dispatch(bench, sid, host_queue, 50)
        base += raw_handoff(bench, sid, 50)
    o = summary(ours)
    return Figure(id="M2", what="dispatch: commit + enqueue -> task starts", unit="ms", ours=o,
                  baseline=summary(base), baseline_name="commit + LPUSH -> BLPOP", target="p50 <= 10 ms",
                  met=o["median"] <= 10)
