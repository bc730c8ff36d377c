"""M4: session start → ready for a turn, cold and from the warm pool, beside `docker run` of the same image with the
same hardening, and `docker start` of a container created ahead."""
from __future__ import annotations

import time
import uuid

from core.events import parse_stream_id
from bench.stats import Figure, summary
from core.limits import DEFAULT_LIMITS

# Limits other than the defaults: such a session never takes a pool container, so it shows the cold path.
COLD_CONFIG = {"limits": {"memory_mb": DEFAULT_LIMITS["memory_mb"] - 1}}


def ready_after(bench, config: dict) -> float:
    """POST /sessions → its `session.status ready` event, in ms (the event's Redis id is stamped when published)."""
    sent = time.time()
    session = bench.call("POST", "/sessions", 201, json={"config": config})
    key, cursor, deadline = bench.events.key(session["id"]), "0-0", time.monotonic() + 120
    while time.monotonic() < deadline:
        for event in bench.events.wait(session["id"], cursor, 1000):
            cursor = event.id
            if event.type == "session.status" and event.data.get("status") == "ready":
                return parse_stream_id(event.id)[0] - sent * 1000
            if event.type == "session.status" and event.data.get("status") == "failed":
                raise RuntimeError(f"session start failed: {event.data}")
    raise RuntimeError(f"session {session['id']} ({key}) was not ready within 120 s")


def docker_run(bench) -> tuple[float, float]:
    """(docker run, docker start of a created container) of a container made by the worker's own recipe
    (DockerRuntime.create_container: the same hardening, limits, network and two named volumes), in ms."""
    runtime, name = bench.runtime, f"{bench.settings.key_prefix}-bench-{uuid.uuid4().hex[:12]}"
    volumes = {"workspace": f"{name}-workspace", "home": f"{name}-home"}
    labels = {"ccd.prefix": bench.settings.key_prefix}
    start = time.monotonic()
    container = runtime.create_container(name, labels, volumes, DEFAULT_LIMITS)
    container.start()
    run_ms = (time.monotonic() - start) * 1000
    runtime.remove_container(container)
    created = runtime.create_container(name, labels, volumes, DEFAULT_LIMITS)
    start = time.monotonic()
    created.start()
    start_ms = (time.monotonic() - start) * 1000
    runtime.remove_container(created)
    return run_ms, start_ms


def settle(bench, timeout: float = 30.0) -> None:
    """Waits until the warm pool is full again: each start is measured on a quiet host, as the baselines are."""
    key, deadline = f"{bench.settings.key_prefix}:pool:{bench.settings.host_name}", time.monotonic() + timeout
    while bench.redis.llen(key) < bench.pool_size and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # the fill's last container is listed a moment before its task ends


def measure(bench, runs: int) -> list[Figure]:
    ready_after(bench, {})  # warm the paths once
    ready_after(bench, COLD_CONFIG)
    docker_run(bench)
    cold, warm, run, start = [], [], [], []
    for _ in range(runs):
        settle(bench)
        warm.append(ready_after(bench, {}))
        settle(bench)
        cold.append(ready_after(bench, COLD_CONFIG))
        r, s = docker_run(bench)
        run.append(r)
        start.append(s)
    c, w, r, s = summary(cold), summary(warm), summary(run), summary(start)
    return [Figure(id="M4-cold", what="session start -> ready, cold", unit="ms", ours=c, baseline=r,
                   baseline_name="docker run", target="<= 1.1x docker run", met=c["median"] <= 1.1 * r["median"]),
            Figure(id="M4-warm", what="session start -> ready, warm pool", unit="ms", ours=w, baseline=s,
                   baseline_name="docker start", target="p50 <= 50 ms", met=w["median"] <= 50)]
