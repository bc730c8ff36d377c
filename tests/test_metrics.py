"""Metrics and readiness: real turns move the web's and the worker's Prometheus figures; /readyz names what is down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from core.queues import RUN_TURN, make_celery
from tests import stack
from tests.stack import free_port
from tests.conftest import wait_for
from tests.test_e2e import Api, Collector, ws_url
from workers.health_server import HealthServer, Readiness

CHAT_ROUTE = "/api/v1/sessions/<session_id>/chat"


def scrape(url: str, **kwargs) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics answer, parsed by prometheus-client, keyed by (name, sorted labels)."""
    response = requests.get(url, timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample with exactly these labels; 0 when absent (a labelled metric shows only values it has seen)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every sample of `name` whose labels include these."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def serve(server: HealthServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


class EventWatcher(threading.Thread):
    """A Celery event monitor, as Flower is one: the app built from settings, a receiver for every event."""

    def __init__(self, settings) -> None:
        super().__init__(daemon=True)
        self.app, self.seen, self.receiver = make_celery(settings, main="ccd-monitor"), [], None

    def run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.seen.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)


@pytest.mark.docker
def test_turns_move_the_web_and_worker_metrics(stack_env, token, settings):
    api, web, worker = Api(stack_env["base"], token("e2e-owner")), stack_env["base"], stack_env["worker_metrics"]
    assert requests.get(f"{worker}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{worker}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["failed"] == [] and set(ready.json()["checks"]) == {"postgres", "redis", "docker"}
    watcher = EventWatcher(stack_env["settings"])
    watcher.start()
    # Subscribed once the worker's heartbeat (every 2 s, an event too) comes through.
    wait_for(lambda: watcher.seen, 15, what="a Celery event (the worker's heartbeat)")

    web_before, worker_before = scrape(f"{web}/metrics"), scrape(f"{worker}/metrics")
    sid = api.session()["id"]
    live = Collector(ws_url(stack_env, token, sid), turns=2)
    live.start()
    ok = api.finished_turn(api.chat(sid, "SAY: counted")["id"])
    bad = api.finished_turn(api.chat(sid, "FAIL: 400")["id"])
    assert (ok["status"], bad["status"]) == ("succeeded", "failed"), (ok, bad)
    frames = live.result()
    web_after = scrape(f"{web}/metrics")
    worker_after = wait_for(lambda: (lambda s: s if value(s, "ccd_turns_finished_total", status="failed")
                                     > value(worker_before, "ccd_turns_finished_total", status="failed") else None)(
        scrape(f"{worker}/metrics")), 30, what="the worker's counters to include the failed turn")

    def grew(samples_before, samples_after, name, **labels) -> float:
        return value(samples_after, name, **labels) - value(samples_before, name, **labels)

    # The worker: one turn each way, each timed; every event it published for them, counted by type.
    for status in ("succeeded", "failed"):
        assert grew(worker_before, worker_after, "ccd_turns_finished_total", status=status) == 1, status
        assert grew(worker_before, worker_after, "ccd_turn_duration_seconds_count", status=status) == 1, status
    assert grew(worker_before, worker_after, "ccd_turn_first_event_seconds_count", status="succeeded") == 1
    duration = grew(worker_before, worker_after, "ccd_turn_duration_seconds_sum", status="succeeded")
    first_event = grew(worker_before, worker_after, "ccd_turn_first_event_seconds_sum", status="succeeded")
    assert 0 < first_event < duration < 120, (first_event, duration)
    stored = redis.Redis.from_url(settings.redis_url, decode_responses=True).xrange(f"{settings.key_prefix}:events:{sid}")
    by_worker = [json.loads(fields["e"])["type"] for _, fields in stored
                 if json.loads(fields["e"])["turn_id"] in (ok["id"], bad["id"])
                 and json.loads(fields["e"])["type"] != "turn.queued"]  # turn.queued is the web's
    published = total(worker_after, "ccd_events_published_total") - total(worker_before, "ccd_events_published_total")
    assert published == len(by_worker), (published, len(by_worker))
    for kind in ("turn.started", "turn.completed", "turn.failed", "claude.result"):
        assert grew(worker_before, worker_after, "ccd_events_published_total", type=kind) == by_worker.count(kind)

    # The web: the two chats by route and status, timed; the live socket's lag; the figures read at scrape time.
    assert grew(web_before, web_after, "ccd_http_requests_total", method="POST", route=CHAT_ROUTE, status="202") == 2
    assert grew(web_before, web_after, "ccd_http_request_duration_seconds_count", method="POST", route=CHAT_ROUTE) == 2
    assert value(web_after, "ccd_http_requests_total", method="POST", route="/api/v1/sessions", status="201") >= 1
    assert grew(web_before, web_after, "ccd_stream_lag_seconds_count", transport="ws") == len(frames)
    assert 0 <= grew(web_before, web_after, "ccd_stream_lag_seconds_sum", transport="ws") < len(frames) * 5
    assert value(web_after, "ccd_turns", status="succeeded") >= value(web_before, "ccd_turns", status="succeeded") + 1
    assert value(web_after, "ccd_turns", status="failed") >= value(web_before, "ccd_turns", status="failed") + 1
    host_queue = stack_env["settings"].host_queue()
    for queue in (stack_env["settings"].placement_queue, stack_env["settings"].webhook_queue, host_queue):
        assert ("ccd_queue_depth", (("queue", queue),)) in web_after, queue
    assert ("ccd_queue_oldest_age_seconds", ()) in web_after
    assert value(web_after, "ccd_sessions", status="ready") + value(web_after, "ccd_sessions", status="busy") >= 1
    assert value(web_after, "ccd_containers_running", queue=host_queue) >= 1
    assert value(web_after, "ccd_dependency_up", dependency="postgres") == 1
    assert value(web_after, "ccd_dependency_up", dependency="redis") == 1

    # Celery task events are on: a monitor (Flower) sees the turns' tasks sent and run.
    wait_for(lambda: sum(e.get("type") == "task-succeeded" for e in watcher.seen) >= 2, 30,
             what="task-succeeded events")
    watcher.stop()
    sent = [e for e in watcher.seen if e.get("type") == "task-sent" and e.get("name") == RUN_TURN]
    assert len(sent) >= 2, [e.get("type") for e in watcher.seen]
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_worker_readyz_names_docker_when_the_engine_is_unreachable(settings, tmp_path):
    missing = {"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"}
    server = HealthServer(("127.0.0.1", 0), Readiness(settings, docker_environ=missing), token="")
    try:
        answer = requests.get(f"{serve(server)}/readyz", timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "unready" and body["failed"] == ["docker"], body
    assert body["checks"]["postgres"] == "ok" and body["checks"]["redis"] == "ok"
    assert "no-such-docker.sock" in body["checks"]["docker"] or "No such file" in body["checks"]["docker"]


def test_web_readyz_names_the_dependency_that_is_down(api_settings):
    from web import create_app

    closed = f"127.0.0.1:{stack.free_port()}"
    no_redis = create_app(replace(api_settings, redis_url=f"redis://{closed}/0")).test_client().get("/readyz")
    assert no_redis.status_code == 503
    assert no_redis.get_json()["error"]["code"] == "redis_unavailable"
    assert no_redis.get_json()["error"]["failed"] == ["redis"]
    no_db = create_app(replace(api_settings, database_url=f"postgresql+psycopg://postgres@{closed}/ccd")
                       ).test_client().get("/readyz")
    assert no_db.status_code == 503
    assert no_db.get_json()["error"] == {"code": "database_unavailable", "failed": ["postgres"],
                                         "message": "not answering: postgres; try again shortly"}
    assert create_app(api_settings).test_client().get("/readyz").get_json() == {"status": "ready"}


def test_metrics_token_guards_the_web_and_worker_scrapes(api_settings, settings):
    from web import create_app

    guarded = create_app(replace(api_settings, metrics_token="scrape-secret")).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = guarded.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert allowed.status_code == 200 and b"ccd_http_requests_total" in allowed.data
    assert create_app(api_settings).test_client().get("/metrics").status_code == 200  # no token set: open

    server = HealthServer(("127.0.0.1", 0), Readiness(settings), token="scrape-secret")
    base = serve(server)
    try:
        assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
        assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer scrape-secret"},
                            timeout=10).status_code == 200
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200  # health stays open
    finally:
        server.shutdown()
        server.server_close()


def test_several_gunicorn_processes_report_one_total_in_multiprocess_mode(settings, tmp_path):
    """Each scrape reaches one process; with PROMETHEUS_MULTIPROC_DIR every one reports the sum of all."""
    port, metrics_dir = stack.free_port(), tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over")  # gunicorn empties the directory at start
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CCD_", "ANTHROPIC_", "PROMETHEUS_"))},
           "JWT_SECRET": settings.jwt_secret, "DATABASE_URL": settings.database_url,
           "REDIS_URL": settings.redis_url, "CCD_KEY_PREFIX": f"{settings.key_prefix}mp",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "WEB_WORKER_CLASS": "gthread", "WEB_THREADS": "1"}
    web = stack.Process("web-multiproc", [sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf",
                                          "-b", f"127.0.0.1:{port}", "-w", "2", "web.wsgi:app"], env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), 30, what="gunicorn to answer")
        with ThreadPoolExecutor(8) as pool:  # more at once than one process (one thread) takes: both serve
            statuses = list(pool.map(lambda _: requests.get(f"{base}/healthz", timeout=10).status_code, range(60)))
        assert statuses == [200] * 60
        time.sleep(0.2)
        counts = [value(scrape(f"{base}/metrics"), "ccd_http_requests_total", method="GET", route="/healthz",
                        status="200") for _ in range(6)]
        served = {p.name for p in metrics_dir.glob("counter_*.db")}
        assert len(served) >= 2 and "counter_1.db" not in served, served
        # Every scrape, whichever process answers it, counts every request (the readiness probes included).
        assert len(set(counts)) == 1 and counts[0] >= 60, counts
    finally:
        web.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def test_the_check_command_answers_for_postgres_and_redis_and_fails_naming_the_one_down(settings, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CCD_")}, "JWT_SECRET": settings.jwt_secret,
           "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"}
    run = [sys.executable, "-m", "workers", "check"]
    ok = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1]) == {"status": "ready", "failed": [],
                                                      "checks": {"postgres": "ok", "redis": "ok"}}
    with_docker = subprocess.run([*run, "--docker"], capture_output=True, text=True, env=env, timeout=60)
    assert with_docker.returncode == 1 and json.loads(with_docker.stdout.splitlines()[-1])["failed"] == ["docker"]
    down = subprocess.run(run, capture_output=True, text=True, timeout=60,
                          env={**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert down.returncode == 1 and json.loads(down.stdout.splitlines()[-1])["failed"] == ["redis"]
