"""When Postgres or Redis is down: a 503 with a clear code, and nothing accepted is lost."""
from dataclasses import replace
from datetime import timedelta

import redis

from web import create_app
from workers.context import WorkerContext
from workers.reaper import reap


def closed_port() -> int:
    from tests.stack import free_port

    return free_port()  # nothing listens there once the probe socket is closed


def test_database_down_is_503(api_settings, auth):
    down = create_app(replace(api_settings, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x"))
    resp = down.test_client().get("/api/v1/sessions", headers=auth())
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "database_unavailable"


def test_chat_with_redis_down_is_503_and_records_no_turn(api_settings, client, auth):
    sid = client.post("/api/v1/sessions", json={}, headers=auth()).get_json()["id"]
    down = create_app(replace(api_settings, redis_url=f"redis://127.0.0.1:{closed_port()}/0"))
    resp = down.test_client().post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "hi"}, headers=auth())
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "redis_unavailable"
    turns = client.get(f"/api/v1/sessions/{sid}/turns", headers=auth()).get_json()
    assert turns["total"] == 0


def test_session_accepted_while_broker_is_down_is_started_by_the_reaper(api_settings, client, auth):
    down = create_app(replace(api_settings, redis_url=f"redis://127.0.0.1:{closed_port()}/0"))
    resp = down.test_client().post("/api/v1/sessions", json={}, headers=auth("outage"))
    assert resp.status_code == 201, resp.get_json()
    sid = resp.get_json()["id"]
    assert client.get(f"/api/v1/sessions/{sid}", headers=auth("outage")).get_json()["status"] == "creating"

    queue_key = f"{api_settings.key_prefix}:celery:{api_settings.placement_queue}"
    broker = redis.Redis.from_url(api_settings.redis_url)
    before = broker.llen(queue_key)
    result = reap(WorkerContext(api_settings), stale_after=timedelta(0))
    assert result["resent"] >= 1
    sent = [m for m in broker.lrange(queue_key, 0, -1) if sid.encode() in m]
    assert broker.llen(queue_key) > before and sent, "the reaper did not re-send the start task"
