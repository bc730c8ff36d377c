"""The job API without a worker (real Postgres and Redis): queue positions, cancelling queued
turns, idempotency keys, admission limits, batch validation, webhook URLs, the events page."""
import json
import secrets
import time
from dataclasses import replace

import pytest
import redis
from sqlalchemy import create_engine, func, select, update

from core.models import Batch, BatchItem, Turn
from tests.test_api import create, error_of


def owner() -> str:
    return f"jobs-{secrets.token_hex(3)}"


def chat(client, headers, sid, prompt="hello", **extra):
    return client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, **extra}, headers=headers)


@pytest.fixture(scope="module")
def db(api_settings):
    engine = create_engine(api_settings.database_url)
    yield engine
    engine.dispose()


def test_queued_turns_show_their_place_and_move_up_when_one_is_cancelled(client, auth):
    who = auth(owner())
    sid = create(client, who).get_json()["id"]
    turns = [chat(client, who, sid, f"p{n}").get_json() for n in range(3)]
    assert [t["queue_position"] for t in turns] == [1, 2, 3]

    resp = client.post(f"/api/v1/turns/{turns[0]['id']}/cancel", headers=who)
    assert resp.status_code == 200, resp.get_json()
    cancelled = resp.get_json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None and cancelled["finished_at"]
    listed = client.get(f"/api/v1/sessions/{sid}/turns", headers=who).get_json()["items"]
    assert [(t["status"], t["queue_position"]) for t in listed] == [("cancelled", None), ("queued", 1), ("queued", 2)]

    again = client.post(f"/api/v1/turns/{turns[0]['id']}/cancel", headers=who)
    assert again.status_code == 409 and error_of(again)["code"] == "turn_finished"


def test_cancelling_a_queued_turn_publishes_turn_cancelled(client, auth, api_settings):
    who = auth(owner())
    sid = create(client, who).get_json()["id"]
    turn = chat(client, who, sid).get_json()
    client.post(f"/api/v1/turns/{turn['id']}/cancel", headers=who)
    page = client.get(f"/api/v1/sessions/{sid}/events", headers=who).get_json()
    assert [e["type"] for e in page["items"]] == ["turn.queued", "turn.cancelled"]
    assert page["items"][0]["id"] == turn["queued_event_id"] and page["has_more"] is False
    stored = redis.Redis.from_url(api_settings.redis_url, decode_responses=True).xrange(
        f"{api_settings.key_prefix}:events:{sid}")
    assert [e["id"] for e in page["items"]] == [i for i, _ in stored]


def test_events_page_through_with_since_and_limit(client, auth):
    who = auth(owner())
    sid = create(client, who).get_json()["id"]
    for n in range(5):
        chat(client, who, sid, f"p{n}")
    seen, since = [], None
    while True:
        url = f"/api/v1/sessions/{sid}/events?limit=2" + (f"&since={since}" if since else "")
        page = client.get(url, headers=who).get_json()
        seen += [e["seq"] for e in page["items"]]
        since = page["next_since"]
        if not page["has_more"]:
            break
    assert seen == [1, 2, 3, 4, 5]
    bad = client.get(f"/api/v1/sessions/{sid}/events?since=yesterday", headers=who)
    assert bad.status_code == 400 and error_of(bad)["field"] == "since"
    assert client.get(f"/api/v1/sessions/{sid}/events?limit=0", headers=who).status_code == 400


def test_wait_returns_202_with_the_turn_as_it_is_when_time_runs_out(client, auth):
    who = auth(owner())
    sid = create(client, who).get_json()["id"]
    started = time.monotonic()
    resp = chat(client, who, sid, wait=1)
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    assert 0.9 < time.monotonic() - started < 5


def test_same_idempotency_key_and_body_returns_the_original_turn(client, auth, db):
    name = owner()
    who = {**auth(name), "Idempotency-Key": "retry-1"}
    sid = create(client, auth(name)).get_json()["id"]
    first, second = chat(client, who, sid, "once"), chat(client, who, sid, "once")
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Turn).where(Turn.prompt == "once",
                                                                        Turn.session_id == sid)) == 1
    other_body = chat(client, who, sid, "twice")
    assert other_body.status_code == 409 and error_of(other_body)["code"] == "idempotency_key_reused"
    # Keys belong to their owner: another owner's identical key is independent.
    stranger = {**auth(owner()), "Idempotency-Key": "retry-1"}
    assert create(client, stranger).status_code == 201


def test_idempotent_session_create_makes_one_session(client, auth):
    name = owner()
    who = {**auth(name), "Idempotency-Key": "make-session"}
    a, b = create(client, who, {"config": {"model": "m"}}), create(client, who, {"config": {"model": "m"}})
    assert a.status_code == b.status_code == 201 and a.get_json()["id"] == b.get_json()["id"]
    assert client.get("/api/v1/sessions", headers=auth(name)).get_json()["total"] == 1


def test_an_empty_or_huge_idempotency_key_is_refused(client, auth):
    resp = create(client, {**auth(owner()), "Idempotency-Key": "k" * 300})
    assert resp.status_code == 400 and error_of(resp)["field"] == "Idempotency-Key"


@pytest.fixture
def limited_client(api_settings):
    from web import create_app

    limited = replace(api_settings, owner_max_sessions=2, owner_max_running_turns=1, owner_max_queued_turns=2)
    return create_app(limited).test_client()


def test_session_limit_answers_429_with_retry_after(limited_client, auth):
    who = auth(owner())
    assert [create(limited_client, who).status_code for _ in range(2)] == [201, 201]
    resp = create(limited_client, who)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) > 0
    err = error_of(resp)
    assert err["code"] == "session_limit" and err["limit"] == 2 and err["retry_after"] > 0


def test_queued_and_running_turn_limits_answer_429(limited_client, auth, db):
    who = auth(owner())
    busy, idle = (create(limited_client, who).get_json()["id"] for _ in range(2))
    assert chat(limited_client, who, busy).status_code == 202          # would run at once
    assert chat(limited_client, who, busy).status_code == 202          # waits: 2 queued now
    full = chat(limited_client, who, busy)
    assert full.status_code == 429 and error_of(full)["code"] == "queued_turn_limit" and full.headers["Retry-After"]
    # One turn running: a turn for an idle session would be a second running turn.
    with db.begin() as conn:
        conn.execute(update(Turn).where(Turn.session_id == busy, Turn.seq == 1).values(status="running"))
    running = chat(limited_client, who, idle)
    assert running.status_code == 429 and error_of(running)["code"] == "running_turn_limit"


def test_a_batch_with_one_bad_item_is_refused_whole_and_stores_nothing(client, auth, db):
    name = owner()
    who = auth(name)
    sid = create(client, who).get_json()["id"]
    items = [{"prompt": f"p{n}", "session_id": sid, "custom_id": f"c{n}"} for n in range(50)]
    items[37] = {"prompt": "   ", "session_id": sid}
    resp = client.post("/api/v1/batches", json={"items": items, "concurrency": 2}, headers=who)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["code"] == "invalid_item" and err["field"] == "items[37].prompt" and "item 37" in err["message"]

    neither = client.post("/api/v1/batches", json={"items": [{"prompt": "x"}]}, headers=who)
    assert neither.status_code == 400 and error_of(neither)["field"] == "items[0]"
    strangers = client.post("/api/v1/batches", json={"items": [{"prompt": "x", "session_id": sid}]},
                            headers=auth(owner()))
    assert strangers.status_code == 400 and error_of(strangers)["field"] == "items[0].session_id"
    too_many = client.post("/api/v1/batches", json=[{"prompt": "x", "config": {}}] * 10_001, headers=who)
    assert too_many.status_code == 413 and error_of(too_many)["code"] == "too_many_items"
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Batch).where(Batch.owner == name)) == 0
        assert conn.scalar(select(func.count()).select_from(Turn).where(Turn.session_id == sid)) == 0


def test_a_batch_is_taken_in_whole_and_released_up_to_its_concurrency(client, auth, db):
    name = owner()
    who = auth(name)
    sid = create(client, who).get_json()["id"]
    lines = "\n".join(json.dumps({"prompt": f"p{n}", "session_id": sid, "custom_id": f"c{n}"}) for n in range(30))
    resp = client.post("/api/v1/batches?concurrency=3", data=lines,
                       headers={**who, "Content-Type": "application/x-ndjson"})
    assert resp.status_code == 202, resp.get_json()
    batch = resp.get_json()
    assert batch["total"] == 30 and batch["concurrency"] == 3 and batch["status"] == "running"
    assert batch["counts"]["queued"] == 3 and batch["counts"]["pending"] == 27 and batch["progress"] == 0
    with db.connect() as conn:
        seqs = conn.execute(select(Turn.seq, Turn.prompt).where(Turn.session_id == sid).order_by(Turn.seq)).all()
        assert [p for _, p in seqs] == ["p0", "p1", "p2"]  # released in item order
        assert conn.scalar(select(func.count()).select_from(BatchItem)
                           .where(BatchItem.batch_id == batch["id"])) == 30

    cancelled = client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=who)
    assert cancelled.status_code == 202
    body = client.get(f"/api/v1/batches/{batch['id']}", headers=who).get_json()
    assert body["status"] == "cancelled" and body["counts"]["cancelled"] == 30 and body["progress"] == 1.0
    results = client.get(f"/api/v1/batches/{batch['id']}/results", headers=who)
    lines = [json.loads(line) for line in results.get_data(as_text=True).splitlines()]
    assert sorted(r["custom_id"] for r in lines) == sorted(f"c{n}" for n in range(30))
    assert {r["status"] for r in lines} == {"cancelled"}
    again = client.post(f"/api/v1/batches/{batch['id']}/cancel", headers=who)
    assert again.status_code == 409 and error_of(again)["code"] == "batch_finished"


def test_webhooks_to_loopback_or_private_addresses_are_refused(api_settings, auth):
    from web import create_app

    client = create_app(replace(api_settings, webhook_allow_private=False)).test_client()
    who = auth(owner())
    sid = create(client, who).get_json()["id"]
    for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest", "ftp://x/"):
        resp = chat(client, who, sid, webhook=url)
        assert resp.status_code == 400 and error_of(resp)["field"] == "webhook", url
    assert client.get(f"/api/v1/sessions/{sid}/turns", headers=who).get_json()["total"] == 0


def test_batch_items_wait_for_the_owners_limit_instead_of_failing(limited_client, auth):
    who = auth(owner())
    sid = create(limited_client, who).get_json()["id"]
    items = [{"prompt": f"p{n}", "session_id": sid} for n in range(3)]
    resp = limited_client.post("/api/v1/batches", json={"items": items, "concurrency": 3}, headers=who)
    assert resp.status_code == 202
    counts = resp.get_json()["counts"]
    # One running turn allowed per owner: one item released, the others wait (none failed).
    assert (counts["queued"], counts["pending"], counts["failed"]) == (1, 2, 0)
    assert create(limited_client, who).status_code == 201
    config_items = [{"prompt": "x", "config": {}} for _ in range(2)]
    body = limited_client.post("/api/v1/batches", json={"items": config_items}, headers=who).get_json()
    assert body["counts"]["pending"] == 2, "no room for another turn (or session): they wait"
