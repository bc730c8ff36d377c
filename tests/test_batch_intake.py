"""Batch intake in bulk, through the real web (gunicorn, gevent): 10,000 items stored and released at once,
each turn queued once with its turn.queued event, and the tasks on the broker real Celery messages. Also the rule
they share with chats: a session's first queued turn gets a run_turn task, the worker sends each next one."""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import replace

import pytest
import redis
import requests
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url

from core.migrate import prepare_database
from core.models import BatchItem, Session, Turn
from core.queues import RUN_TURN, START_SESSION, make_celery
from tests import stack
from tests.conftest import wait_for
from workers.context import WorkerContext
from workers.turn_runner import TurnRunner

N = 10_000
SESSIONS = 20
MADE = 500  # items with `config`: each gets a session of its own
HOST_QUEUE = "ccd.host.intake-test"


@pytest.fixture(scope="module")
def intake(settings):
    """A web of our own, with no worker on its queues and owner limits above 10,000 turns. Its database is its own
    too: the stack's reaper would otherwise re-send the thousands of turns and sessions it leaves queued."""
    database_url = make_url(settings.database_url)
    database_url = database_url.set(database=f"{database_url.database}_intake").render_as_string(hide_password=False)
    prepare_database(database_url)
    s = replace(settings, key_prefix=f"{settings.key_prefix}intake", database_url=database_url)
    port = stack.free_port()
    env = stack.service_env(s, gateway="", model_url="", port=port, LOG_LEVEL="WARNING",
                            CCD_OWNER_MAX_SESSIONS="100000", CCD_OWNER_MAX_RUNNING_TURNS="100000",
                            CCD_OWNER_MAX_QUEUED_TURNS="100000")
    web = stack.start_web(env, port, name="intake-web")
    engine = create_engine(s.database_url)
    yield {"base": f"http://127.0.0.1:{port}/api/v1", "settings": s, "engine": engine}
    engine.dispose()
    web.stop()
    stack.drop_database(database_url)


def ready_sessions(intake, headers: dict, n: int) -> list[str]:
    """Sessions made through the API, then marked running on a host (no worker starts them here)."""
    sids = [requests.post(f"{intake['base']}/sessions", json={}, headers=headers, timeout=30).json()["id"]
            for _ in range(n)]
    with intake["engine"].begin() as conn:
        conn.execute(update(Session).where(Session.id.in_(sids)).values(status="ready", host_queue=HOST_QUEUE))
    return sids


def drain(settings, queue: str) -> list:
    """Every message on a queue, read back by a kombu consumer of the Celery app's broker connection."""
    app = make_celery(settings)
    messages = []
    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as q:
        while True:
            try:
                message = q.get(timeout=0.5)
            except q.Empty:
                return messages
            message.ack()
            messages.append(message)


def test_ten_thousand_items_are_stored_and_each_queued_once_as_a_turn_with_celery_tasks(intake, token):
    s, engine = intake["settings"], intake["engine"]
    headers = {"Authorization": f"Bearer {token('intake-owner')}"}
    sids = ready_sessions(intake, headers, SESSIONS)
    items = [{"prompt": f"SAY: {n}", "session_id": sids[n % SESSIONS], "custom_id": f"c{n}"} for n in range(N - MADE)]
    items += [{"prompt": f"SAY: made {n}", "config": {"model": "m"}, "custom_id": f"m{n}"} for n in range(MADE)]
    body = "\n".join(json.dumps(item) for item in items)

    started = time.monotonic()
    resp = requests.post(f"{intake['base']}/batches?concurrency={N}", data=body, timeout=120,
                         headers={**headers, "Content-Type": "application/x-ndjson"})
    took = time.monotonic() - started
    assert resp.status_code == 202, resp.text[:500]
    batch = resp.json()
    print(f"10,000 items: POST answered in {took:.2f}s")
    assert batch["total"] == N and batch["counts"]["queued"] == N and batch["counts"]["pending"] == 0

    with engine.connect() as conn:
        rows = conn.execute(select(BatchItem.index, BatchItem.status, BatchItem.turn_id, BatchItem.session_id,
                                   BatchItem.custom_id).where(BatchItem.batch_id == batch["id"])).all()
        turns = {t.id: t for t in conn.execute(select(Turn.id, Turn.session_id, Turn.seq, Turn.prompt, Turn.status,
                                                      Turn.queued_event_id).where(Turn.batch_id == batch["id"]))}
        made = conn.execute(select(Session.id, Session.status, Session.owner, Session.turn_count, Session.root_id,
                                   Session.workspace, Session.config)
                            .where(Session.id.in_([r.session_id for r in rows if r.index >= N - MADE]))).all()
        counts = dict(conn.execute(select(Session.id, Session.turn_count).where(Session.id.in_(sids))).all())
    assert len(rows) == N and {r.status for r in rows} == {"released"}
    assert len({r.turn_id for r in rows}) == N and set(turns) == {r.turn_id for r in rows}, "one turn per item"
    for r in rows:
        turn = turns[r.turn_id]
        assert turn.status == "queued" and turn.session_id == r.session_id and turn.queued_event_id
        assert turn.prompt == items[r.index]["prompt"] and r.custom_id == items[r.index]["custom_id"]
    # Each named session took its items in item order, seq 1, 2, 3, ... without gaps.
    by_session = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.index):
        by_session[r.session_id].append(turns[r.turn_id].seq)
    for sid in sids:
        seqs = by_session[uuid.UUID(sid)]
        assert seqs == list(range(1, len(seqs) + 1)) and counts[uuid.UUID(sid)] == len(seqs)
    assert len(made) == MADE
    for row in made:
        assert (row.status, row.owner, row.turn_count, row.root_id) == ("creating", "intake-owner", 1, row.id)
        assert row.workspace == {"type": "ephemeral"} and row.config["model"] == "m" and "limits" in row.config

    # Every turn's turn.queued event is in its session's stream exactly once, under the id the turn holds.
    client = redis.Redis.from_url(s.redis_url, decode_responses=True)
    seen = Counter()
    for sid in {str(t.session_id) for t in turns.values()}:
        for entry_id, fields in client.xrange(f"{s.key_prefix}:events:{sid}"):
            event = json.loads(fields["e"])
            if event["type"] == "turn.queued":
                seen[event["turn_id"]] += 1
                assert turns[uuid.UUID(event["turn_id"])].queued_event_id == entry_id
    assert seen == Counter({str(t): 1 for t in turns})

    # Tasks: a start per made session, and a run_turn per named session for its first new turn (the
    # worker sends each next one when a turn ends). They are Celery messages a Celery consumer decodes.
    wait_for(lambda: client.llen(f"{s.key_prefix}:celery:{s.placement_queue}") >= SESSIONS + MADE
             and client.llen(f"{s.key_prefix}:celery:{HOST_QUEUE}") >= SESSIONS, 30, what="the tasks")
    starts = drain(s, s.placement_queue)
    runs = drain(s, HOST_QUEUE)
    assert Counter(m.headers["task"] for m in starts) == {START_SESSION: SESSIONS + MADE}
    assert {m.payload[0][0] for m in starts} >= {str(row.id) for row in made}
    firsts = {str(t.id) for t in turns.values() if t.seq == 1 and str(t.session_id) in sids}
    assert [m.headers["task"] for m in runs] == [RUN_TURN] * SESSIONS
    assert {m.payload[0][0] for m in runs} == firsts
    for m in runs:
        assert m.headers["id"] == m.properties["correlation_id"] and m.payload[1] == {} and m.headers["argsrepr"]


def test_a_bad_item_among_ten_thousand_is_named_and_nothing_is_stored(intake, token):
    headers = {"Authorization": f"Bearer {token('intake-bad')}"}
    sid = ready_sessions(intake, headers, 1)[0]
    items = [{"prompt": f"p{n}", "session_id": sid} for n in range(N)]
    items[9_876] = {"prompt": "p", "session_id": sid, "config": {}}
    resp = requests.post(f"{intake['base']}/batches", json={"items": items, "concurrency": N}, headers=headers,
                         timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_item" and resp.json()["error"]["field"] == "items[9876]"
    with intake["engine"].connect() as conn:
        assert conn.scalar(select(Turn.id).where(Turn.session_id == sid)) is None


def test_chats_behind_a_turn_send_no_task_and_a_head_cancelled_while_queued_hands_its_place_on(intake, token):
    """A chat on an idle session sends its run_turn; chats queued behind it send none (the worker that ends a turn
    sends the next). A head cancelled before a worker took it: its task, when it comes, sends the next one."""
    s = intake["settings"]
    headers = {"Authorization": f"Bearer {token('intake-chat-chain')}"}
    sid = ready_sessions(intake, headers, 1)[0]
    drain(s, HOST_QUEUE)  # what earlier tests left there
    turns = [requests.post(f"{intake['base']}/sessions/{sid}/chat", json={"prompt": f"p{n}"}, headers=headers,
                           timeout=30).json()["id"] for n in range(3)]
    assert [m.payload[0][0] for m in drain(s, HOST_QUEUE)] == [turns[0]]
    cancelled = requests.post(f"{intake['base']}/turns/{turns[0]}/cancel", headers=headers, timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert drain(s, HOST_QUEUE) == []
    ctx = WorkerContext(s)
    try:
        TurnRunner(ctx).run(turns[0])  # the cancelled head's task arrives at a worker: not its to run
    finally:
        ctx.engine.dispose()
    assert [(m.headers["task"], m.payload[0][0]) for m in drain(s, HOST_QUEUE)] == [(RUN_TURN, turns[1])]
    with intake["engine"].connect() as conn:
        assert dict(conn.execute(select(Turn.id, Turn.status).where(Turn.session_id == sid)).all()) == {
            uuid.UUID(turns[0]): "cancelled", uuid.UUID(turns[1]): "queued", uuid.UUID(turns[2]): "queued"}


@pytest.mark.docker
def test_turns_released_together_on_one_ready_session_all_run_in_order(stack_env, token):
    """One run_turn goes out per session; the real worker runs the rest one after another."""
    from tests.test_e2e import Api

    api = Api(stack_env["base"], token("intake-chain"))
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    items = [{"prompt": f"SAY: chained {n}", "session_id": sid, "custom_id": f"k{n}"} for n in range(5)]
    items.append({"prompt": "SAY: on its own", "config": {}, "custom_id": "own"})
    batch = api.call("POST", "/api/v1/batches", 202, json={"items": items, "concurrency": 6})
    assert batch["counts"]["queued"] + batch["counts"]["running"] == 6
    resp = requests.get(f"{api.base}/api/v1/batches/{batch['id']}/results?follow=true", headers=api.headers,
                        stream=True, timeout=300)
    lines = {r["custom_id"]: r for r in (json.loads(line) for line in resp.iter_lines() if line)}
    assert {k: r["status"] for k, r in lines.items()} == {**{f"k{n}": "succeeded" for n in range(5)}, "own": "succeeded"}
    assert [lines[f"k{n}"]["result"] for n in range(5)] == [f"chained {n}" for n in range(5)]
    turns = api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)["items"]
    assert [t["seq"] for t in turns] == [1, 2, 3, 4, 5]
    assert [t["started_at"] for t in turns] == sorted(t["started_at"] for t in turns)
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
    api.call("DELETE", f"/api/v1/sessions/{lines['own']['session_id']}", 202)
