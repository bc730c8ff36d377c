"""The job API end to end with the real stack and the real Claude Code: wait, stream (NDJSON and
SSE), poll, resume after a drop, idempotent retries, cancellation, batches, webhooks."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
import websocket
from sqlalchemy import create_engine, select

from core.models import Turn
from core.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import wait_for
from tests.receiver import Receiver
from tests.test_e2e import FINAL, Api, container_of

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("jobs-owner"))


def stream_ids(settings, sid: str) -> list[str]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return [entry_id for entry_id, _ in client.xrange(f"{settings.key_prefix}:events:{sid}")]


def post_chat(api: Api, sid: str, body: dict, **headers) -> requests.Response:
    return requests.post(f"{api.base}/api/v1/sessions/{sid}/chat", json=body, timeout=120,
                         headers={**api.headers, **headers}, stream=bool(body.get("stream")))


def read_sse(resp: requests.Response, stop_after: int | None = None) -> list[dict]:
    """Envelopes from an SSE response, until a final turn event or `stop_after` frames."""
    frames, data = [], []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and data:
            frames.append(json.loads("\n".join(data)))
            data = []
            if frames[-1]["type"] in FINAL or (stop_after and len(frames) >= stop_after):
                break
    return frames


def test_wait_stream_sse_and_poll_give_the_same_result_for_the_same_turn(api):
    sid = api.session()["id"]
    key = {"Idempotency-Key": "same-turn"}
    body = {"prompt": "SAY: one answer, four ways"}

    streamed = post_chat(api, sid, {**body, "stream": True}, **key)
    assert streamed.status_code == 200 and streamed.headers["Content-Type"].startswith("application/x-ndjson")
    ndjson = [json.loads(line) for line in streamed.iter_lines() if line]
    turn_id = streamed.headers["X-Turn-Id"]
    assert ndjson[0]["type"] == "turn.queued" and ndjson[-1]["type"] == "turn.completed"
    assert {f["turn_id"] for f in ndjson} == {turn_id}

    # The same key and body: the same turn, followed again by each other way.
    waited = post_chat(api, sid, {**body, "wait": 60}, **key)
    assert waited.status_code == 200, waited.text
    sse = post_chat(api, sid, {**body, "stream": True}, Accept="text/event-stream", **key)
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    sse_frames = read_sse(sse)
    polled = api.finished_turn(turn_id)

    assert waited.json()["id"] == turn_id and polled["status"] == "succeeded"
    assert polled["result"] == "one answer, four ways"
    for final in (ndjson[-1]["data"], sse_frames[-1]["data"], waited.json()):
        assert (final["result"], final["usage"], final["cost_usd"]) == (polled["result"], polled["usage"], polled["cost_usd"])
    assert [f["id"] for f in sse_frames] == [f["id"] for f in ndjson], "both streams carry the same events"
    assert api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)["total"] == 1
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_sse_and_websocket_resume_mid_turn_without_loss_or_repeats(stack_env, api, token):
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    turn = api.chat(sid, "SLOW: 4")
    events_url = f"{api.base}/api/v1/sessions/{sid}/events"
    sse_headers = {**api.headers, "Accept": "text/event-stream"}

    first = requests.get(events_url, headers=sse_headers, stream=True, timeout=60)
    part = read_sse(first, stop_after=6)
    first.close()  # the connection drops mid-turn
    assert part[-1]["type"] not in FINAL
    rest = read_sse(requests.get(events_url, headers={**sse_headers, "Last-Event-ID": part[-1]["id"]},
                                 stream=True, timeout=60))
    sse_ids = [f["id"] for f in part + rest]

    # The WebSocket the same way: drop after a few frames, reconnect with since.
    ws_base = f"{stack_env['ws']}/api/v1/sessions/{sid}/stream?token={token('jobs-owner')}"
    ws = websocket.create_connection(ws_base, timeout=60)
    head = [json.loads(ws.recv()) for _ in range(4)]
    ws.close()
    ws = websocket.create_connection(f"{ws_base}&since={head[-1]['id']}", timeout=60)
    tail = []
    while not tail or tail[-1]["type"] not in FINAL:
        tail.append(json.loads(ws.recv()))
    ws.close()

    assert api.finished_turn(turn["id"])["status"] == "succeeded"
    stored = stream_ids(stack_env["settings"], sid)
    assert sse_ids == stored and len(set(sse_ids)) == len(sse_ids)
    assert [f["id"] for f in head + tail] == stored
    assert sum(f["type"] == "claude.stream_event" for f in rest) > 3, "the turn was still streaming at the drop"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_five_concurrent_retries_with_one_key_make_one_turn(api, stack_env):
    sid = api.session()["id"]
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: post_chat(api, sid, {"prompt": "SAY: only once"},
                                                    **{"Idempotency-Key": "five-at-once"}), range(5)))
    assert [a.status_code for a in answers] == [202] * 5
    assert len({a.json()["id"] for a in answers}) == 1
    api.finished_turn(answers[0].json()["id"])
    assert api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)["total"] == 1
    runs = [r for r in stack_env["model"].tool_requests() if "only once" in json.dumps(r["messages"])]
    assert len(runs) == 1, "the model was asked exactly once"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def claude_processes(docker_client, settings, sid: str) -> list[str]:
    """Command lines of Claude Code processes in the session's container."""
    script = ("import os\nfor p in os.listdir('/proc'):\n if p.isdigit():\n  try: c=open(f'/proc/{p}/cmdline','rb')"
              ".read().replace(b'\\0',b' ').decode()\n  except OSError: continue\n"
              "  if 'claude' in c and 'wrapper' not in c: print(c)")
    out = container_of(docker_client, settings, sid).exec_run(["python3", "-c", script], user="agent")
    return [line for line in out.output.decode().splitlines() if line.strip()]


def test_cancel_interrupts_a_streaming_turn_and_the_session_carries_on(stack_env, api, docker_client):
    settings = stack_env["settings"]
    sid = api.session()["id"]
    turn = api.chat(sid, "SLOW: 120")
    queued = api.chat(sid, "SAY: never runs")

    def streaming():
        page = api.call("GET", f"/api/v1/sessions/{sid}/events?limit=1000", 200)
        return sum(e["type"] == "claude.stream_event" for e in page["items"]) >= 3
    wait_for(streaming, 60, what="the long turn to stream")
    before = claude_processes(docker_client, settings, sid)
    assert before, "Claude Code runs before the cancel"

    assert api.call("POST", f"/api/v1/turns/{queued['id']}/cancel", 200)["status"] == "cancelled"
    asked = time.monotonic()
    accepted = api.call("POST", f"/api/v1/turns/{turn['id']}/cancel", 202)
    assert accepted["status"] == "running" and accepted["cancel_requested_at"]
    ended = api.finished_turn(turn["id"], timeout=60)
    took = time.monotonic() - asked
    bound = 3 * settings.cancel_grace_seconds + 5
    assert ended["status"] == "cancelled" and took < bound, (ended, took)
    # Claude Code stopped the turn itself (its control protocol's interrupt) and stays for the next turn.
    assert claude_processes(docker_client, settings, sid) == before, "the hot Claude Code is kept"
    page = api.call("GET", f"/api/v1/sessions/{sid}/events?limit=1000", 200)["items"]
    finals = [(e["turn_id"], e["type"]) for e in page if e["type"] in FINAL]
    assert finals == [(queued["id"], "turn.cancelled"), (turn["id"], "turn.cancelled")]
    api.call("POST", f"/api/v1/turns/{turn['id']}/cancel", 409)

    after = api.finished_turn(api.chat(sid, "SAY: still here")["id"])
    assert after["status"] == "succeeded" and after["result"] == "still here"
    assert api.call("GET", f"/api/v1/sessions/{sid}", 200)["status"] == "ready"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_stopping_a_session_cancels_its_running_and_queued_turns(api):
    sid = api.session()["id"]
    running = api.chat(sid, "SLOW: 120")
    waiting = api.chat(sid, "SAY: later")
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{running['id']}", 200)["status"] == "running", 60,
             what="the turn to start")
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    assert api.finished_turn(waiting["id"], timeout=5)["status"] == "cancelled"
    assert api.finished_turn(running["id"], timeout=60)["status"] == "cancelled"
    api.session_status(sid, "stopped")
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def test_batch_of_200_over_20_sessions_runs_at_most_4_at_once(api, stack_env):
    sids = [api.session()["id"] for _ in range(20)]
    items = [{"prompt": f"SAY: answer {n}", "session_id": sids[n % 20], "custom_id": f"item-{n}"} for n in range(200)]
    batch = api.call("POST", "/api/v1/batches", 202, json={"items": items, "concurrency": 4})
    assert batch["total"] == 200

    # Results stream while the batch runs, one line per item, each once.
    resp = requests.get(f"{api.base}/api/v1/batches/{batch['id']}/results?follow=true", headers=api.headers,
                        stream=True, timeout=600)
    lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert len(lines) == 200 and {r["custom_id"] for r in lines} == {f"item-{n}" for n in range(200)}
    by_id = {r["custom_id"]: r for r in lines}
    for n in range(200):
        r = by_id[f"item-{n}"]
        assert r["status"] == "succeeded" and r["result"] == f"answer {n}", r
        assert r["session_id"] == sids[n % 20] and r["usage"] and r["cost_usd"] > 0
    done = api.call("GET", f"/api/v1/batches/{batch['id']}", 200)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 200 and done["progress"] == 1.0

    engine = create_engine(stack_env["settings"].database_url)
    with engine.connect() as conn:
        spans = conn.execute(select(Turn.started_at, Turn.finished_at).where(Turn.batch_id == batch["id"])).all()
    engine.dispose()
    assert len(spans) == 200
    assert max_overlap([(s.timestamp(), f.timestamp()) for s, f in spans]) <= 4
    for sid in sids:
        api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_cancelling_a_batch_midway_leaves_nothing_running(api):
    receiver = Receiver()
    items = [{"prompt": "SLOW: 30", "config": {}, "custom_id": f"slow-{n}"} for n in range(6)]
    batch = api.call("POST", "/api/v1/batches", 202, json={"items": items, "concurrency": 2,
                                                           "webhook": receiver.url})
    wait_for(lambda: api.call("GET", f"/api/v1/batches/{batch['id']}", 200)["counts"]["running"] >= 1, 90,
             what="a batch turn to start")
    api.call("POST", f"/api/v1/batches/{batch['id']}/cancel", 202)

    def settled():
        body = api.call("GET", f"/api/v1/batches/{batch['id']}", 200)
        return body if not any(body["counts"][s] for s in ("pending", "queued", "running")) else None
    body = settled_body = wait_for(settled, 60, what="the batch to settle")
    assert body["status"] == "cancelled" and settled_body["counts"]["cancelled"] == 6, f"counts: {body['counts']}"
    results = requests.get(f"{api.base}/api/v1/batches/{batch['id']}/results", headers=api.headers, timeout=30)
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert len(lines) == 6 and {r["status"] for r in lines} == {"cancelled"}
    # The batch's webhook comes once everything has settled, with the final counts.
    wait_for(lambda: receiver.calls and receiver.calls[-1][0] == 200, 30, what="the batch webhook")
    hooked = json.loads(receiver.calls[-1][2])
    assert hooked["id"] == batch["id"] and hooked["status"] == "cancelled" and hooked["counts"]["cancelled"] == 6
    assert hooked["finished_at"] and hooked["webhook_status"] == "pending"  # as it was when sent
    receiver.server.shutdown()
    for sid in {r["session_id"] for r in lines if r["session_id"]}:
        turns = api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)["items"]
        assert all(t["status"] not in ("queued", "running") for t in turns)
        api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_webhook_is_signed_retried_after_a_500_and_delivered_once(api, stack_env):
    receiver = Receiver(lambda before: 500 if not before else 200)  # the first delivery fails
    sid = api.session()["id"]
    turn = api.call("POST", f"/api/v1/sessions/{sid}/chat", 202,
                    json={"prompt": "SAY: hooked", "webhook": receiver.url})
    wait_for(lambda: len(receiver.calls) >= 2, 60, what="the webhook to be retried")
    time.sleep(3)  # time for a wrong extra delivery to show up
    receiver.server.shutdown()
    assert [status for status, _, _ in receiver.calls] == [500, 200]
    _, headers, body = receiver.calls[-1]
    assert verify(stack_env["settings"].webhook_secret, headers[SIGNATURE_HEADER], body)
    assert not verify("another-webhook-secret-of-32-bytes", headers[SIGNATURE_HEADER], body)
    delivered = json.loads(body)
    assert delivered["id"] == turn["id"] and delivered["status"] == "succeeded" and delivered["result"] == "hooked"
    assert api.call("GET", f"/api/v1/turns/{turn['id']}", 200)["webhook_status"] == "delivered"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_websocket_takes_chat_and_cancel_commands_and_sends_heartbeats(stack_env, api, token):
    sid = api.session()["id"]
    ws = websocket.create_connection(f"{stack_env['ws']}/api/v1/sessions/{sid}/stream?token={token('jobs-owner')}",
                                     timeout=60)
    frames, replies, pings = [], [], 0

    def receive_until(done):
        nonlocal pings
        while not done():
            op, frame = ws.recv_data_frame(control_frame=True)
            if op == websocket.ABNF.OPCODE_PING:
                pings += 1
                ws.pong(frame.data)
            elif op == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(frame.data)
                (replies if message["type"] == "reply" else frames).append(message)

    ws.send(json.dumps({"type": "chat", "prompt": "SLOW: 60", "id": "first"}))
    receive_until(lambda: replies)
    assert replies[0]["id"] == "first" and replies[0]["ok"] is True
    long_turn = replies[0]["turn"]
    receive_until(lambda: any(f["type"] == "turn.started" for f in frames))
    ws.send(json.dumps({"type": "chat", "prompt": "SAY: after the cancel", "id": "second"}))
    ws.send(json.dumps({"type": "cancel", "turn_id": long_turn["id"], "id": "stop-it"}))
    ws.send(json.dumps({"type": "dance"}))
    ws.send("not json")
    receive_until(lambda: len(replies) >= 5)
    by_id = {r["id"]: r for r in replies}
    assert by_id["second"]["ok"] and by_id["second"]["turn"]["queue_position"] == 1
    assert by_id["stop-it"]["ok"] and by_id["stop-it"]["turn"]["id"] == long_turn["id"]
    assert [r["error"]["code"] for r in replies if not r["ok"]] == ["unknown_command", "invalid_json"]

    second_id = by_id["second"]["turn"]["id"]
    receive_until(lambda: any(f["type"] == "turn.completed" and f["turn_id"] == second_id for f in frames))
    finals = [(f["turn_id"], f["type"]) for f in frames if f["type"] in FINAL]
    assert finals == [(long_turn["id"], "turn.cancelled"), (second_id, "turn.completed")]
    # An idle socket still gets pings (CCD_WS_PING_SECONDS=3 in the test stack).
    quiet_until = time.monotonic() + 7
    ws.settimeout(8)
    receive_until(lambda: time.monotonic() > quiet_until)
    assert pings >= 2
    ws.close()
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
