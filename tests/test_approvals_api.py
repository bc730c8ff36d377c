"""Tool approvals against the real Postgres and Redis: core/approvals.py, the REST answer and listing, the
WebSocket command (a real gunicorn), the turn's pending approvals, and the approval.requested webhook."""
from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import redis
import websocket
from sqlalchemy import event, select

from core import approvals
from core.cancels import CancelSignals
from core.db import make_engine, make_session_factory, transaction
from core.envelope import Event
from core.errors import NotFound, WrongState
from core.models import Approval, Session, Turn, utcnow
from core.session_tokens import mint_session_token
from core.webhooks import verify
from tests import stack
from tests.receiver import Receiver

BASH = {"command": "rm -rf build"}
# What Claude Code 2.1.330 sends as a can_use_tool request's permission_suggestions for a Bash command.
SUGGESTIONS = [{"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": "rm -rf build"}],
                "behavior": "allow", "destination": "session"}]


@pytest.fixture(scope="module")
def db(api_settings):
    engine = make_engine(api_settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def owner():
    return f"appr-{uuid.uuid4().hex[:8]}"


def running_turn(db, owner: str, webhook: str | None = None, seq: int = 1, session_id=None) -> tuple[str, str]:
    """A ready session (or `session_id`) with a running turn: (session id, turn id)."""
    with transaction(db) as s:
        if session_id is None:
            session = Session(owner=owner, status="ready", config={"approvals": "ask"})
            s.add(session)
            s.flush()
            session_id = session.id
        turn = Turn(session_id=session_id, seq=seq, prompt="clean up", status="running", started_at=utcnow(),
                    webhook=webhook, webhook_status="pending" if webhook else None)
        s.add(turn)
        s.flush()
        return str(session_id), str(turn.id)


def ask(db, session_id: str, turn_id: str, request_id: str | None = None, tool: str = "Bash", input=None,
        suggestions=SUGGESTIONS, deadline_in: float = 600) -> Approval:
    """What the worker does when Claude Code asks: opens the approval."""
    with transaction(db) as s:
        return approvals.open_approval(
            s, turn_id=turn_id, session_id=session_id, request_id=request_id or f"toolu_{uuid.uuid4().hex[:12]}",
            tool_name=tool, input=BASH if input is None else input, suggestions=suggestions,
            deadline=utcnow() + timedelta(seconds=deadline_in))


def answer_url(turn_id: str, request_id: str) -> str:
    return f"/api/v1/turns/{turn_id}/approvals/{request_id}"


def row(db, approval_id) -> Approval:
    with transaction(db) as s:
        return s.get(Approval, approval_id)


def events_of(client, headers, session_id: str, kind: str) -> list[dict]:
    """The session's events of one type, read back through the API."""
    items = client.get(f"/api/v1/sessions/{session_id}/events", headers=headers).get_json()["items"]
    return [e for e in items if e["type"] == kind]


def signals(api_settings, turn_id: str) -> list[str]:
    """Every signal waiting for the turn's worker, taken."""
    cancels = CancelSignals(redis.Redis.from_url(api_settings.redis_url, decode_responses=True),
                            api_settings.key_prefix)
    found = []
    while (signal := cancels.wait(turn_id, 0.1)) is not None:
        found.append(signal)
    return found


def error_of(resp) -> dict:
    body = resp.get_json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_allow_with_an_edited_input_resolves_announces_and_wakes_the_worker(client, auth, db, owner, api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    edited = {"command": "rm -rf build/tmp"}
    resp = client.post(answer_url(tid, approval.request_id), headers=auth(owner),
                       json={"behavior": "allow", "updated_input": edited})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["status"] == "allowed" and body["decided_by"] == owner and body["resolved_at"]
    assert body["decision"] == {"behavior": "allow", "updated_input": edited, "remember": False, "via": "rest"}
    assert set(body) == {"id", "turn_id", "session_id", "request_id", "tool_name", "input", "suggestions", "status",
                         "decision", "decided_by", "deadline", "created_at", "resolved_at"}
    [resolved] = events_of(client, auth(owner), sid, "approval.resolved")
    assert resolved["turn_id"] == tid and resolved["seq"] == 1
    assert resolved["data"] | {"resolved_at": None} == {
        "request_id": approval.request_id, "status": "allowed", "behavior": "allow", "decided_by": owner,
        "via": "rest", "resolved_at": None, "updated_input": edited, "remember": False}
    assert resolved["data"]["resolved_at"].endswith("Z")
    assert signals(api_settings, tid) == ["answer"]
    # What the worker sends Claude Code: the edited command, not the one it asked for.
    assert approvals.control_answer(row(db, approval.id)) == {"behavior": "allow", "updatedInput": edited}


def test_deny_with_a_message_tells_the_model_that_message(client, auth, db, owner, api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    resp = client.post(answer_url(tid, approval.request_id), headers=auth(owner),
                       json={"behavior": "deny", "message": "not the build dir, use make clean"})
    assert resp.status_code == 200 and resp.get_json()["status"] == "denied"
    assert approvals.control_answer(row(db, approval.id)) == {"behavior": "deny",
                                                              "message": "not the build dir, use make clean"}
    [resolved] = events_of(client, auth(owner), sid, "approval.resolved")
    assert resolved["data"]["message"] == "not the build dir, use make clean"
    assert resolved["data"]["behavior"] == "deny" and "updated_input" not in resolved["data"]
    assert signals(api_settings, tid) == ["answer"]


def test_a_deny_without_a_message_says_who_denied(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    assert client.post(answer_url(tid, approval.request_id), headers=auth(owner),
                       json={"behavior": "deny"}).status_code == 200
    answer = approvals.control_answer(row(db, approval.id))
    assert answer["behavior"] == "deny" and owner in answer["message"]


def test_answering_twice_is_a_409_and_the_first_answer_stands(client, auth, db, owner, api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    url = answer_url(tid, approval.request_id)
    assert client.post(url, headers=auth(owner), json={"behavior": "deny"}).status_code == 200
    again = client.post(url, headers=auth(owner), json={"behavior": "allow"})
    assert again.status_code == 409 and error_of(again)["code"] == "approval_resolved"
    assert row(db, approval.id).status == "denied"
    assert len(events_of(client, auth(owner), sid, "approval.resolved")) == 1
    assert signals(api_settings, tid) == ["answer"]


def test_two_answers_at_once_one_waits_for_the_others_row_lock_and_gets_a_409(db, owner):
    """The second answer blocks on SELECT ... FOR UPDATE while the first is uncommitted, then sees it resolved."""
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    first_holds, first_may_commit = threading.Event(), threading.Event()

    def answer(behavior: str, hold: bool) -> str:
        with transaction(db) as s:
            approvals.resolve(s, owner=owner, turn_id=tid, request_id=approval.request_id, behavior=behavior,
                              decided_by=owner, via="rest")
            if hold:
                first_holds.set()
                first_may_commit.wait(10)
        return behavior

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(answer, "allow", True)
        assert first_holds.wait(10)
        second = pool.submit(answer, "deny", False)
        time.sleep(0.5)
        assert not second.done(), "the second answer did not wait for the first one's lock"
        first_may_commit.set()
        assert first.result(10) == "allow"
        with pytest.raises(WrongState) as refused:
            second.result(10)
    assert refused.value.code == "approval_resolved" and refused.value.status == 409
    assert row(db, approval.id).status == "allowed"


def test_concurrent_http_answers_give_one_200_and_one_409(app, auth, db, owner):
    sid, tid = running_turn(db, owner)
    for _ in range(5):
        approval = ask(db, sid, tid)
        url, headers = answer_url(tid, approval.request_id), auth(owner)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: app.test_client().post(url, headers=headers, json={"behavior": b}),
                                    ["allow", "deny"]))
        assert sorted(r.status_code for r in answers) == [200, 409]
        winner = next(r for r in answers if r.status_code == 200).get_json()["status"]
        assert row(db, approval.id).status == winner


def test_unknown_requests_and_turns_are_404(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    ask(db, sid, tid)
    for url in (answer_url(tid, "toolu_nope"), answer_url(str(uuid.uuid4()), "toolu_nope"),
                answer_url("not-a-uuid", "toolu_nope"), answer_url(tid, "a%00b"), answer_url(tid, "x" * 300)):
        resp = client.post(url, headers=auth(owner), json={"behavior": "allow"})
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found", (url, resp.get_json())
    assert client.get(f"/api/v1/turns/{uuid.uuid4()}/approvals", headers=auth(owner)).status_code == 404


def test_another_owners_approval_is_a_404_and_stays_pending(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    mallory = auth(f"mallory-{uuid.uuid4().hex[:6]}")
    resp = client.post(answer_url(tid, approval.request_id), headers=mallory, json={"behavior": "allow"})
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    assert client.get(f"/api/v1/turns/{tid}/approvals", headers=mallory).status_code == 404
    assert row(db, approval.id).status == "pending"


def test_a_session_token_may_not_answer_even_its_own_sessions_approval(client, db, owner, api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    agent = {"Authorization": f"Bearer {mint_session_token(api_settings.jwt_secret, owner, sid, 600)}"}
    resp = client.post(answer_url(tid, approval.request_id), headers=agent, json={"behavior": "allow"})
    assert resp.status_code == 403 and error_of(resp)["code"] == "forbidden", resp.get_json()
    assert row(db, approval.id).status == "pending"
    # Reading them is what it may do already through the turn.
    listed = client.get(f"/api/v1/turns/{tid}/approvals", headers=agent)
    assert listed.status_code == 200 and [a["id"] for a in listed.get_json()["approvals"]] == [str(approval.id)]


@pytest.mark.parametrize("body,status,code,field", [
    ({"behavior": "maybe"}, 400, "validation_error", "behavior"),
    ({}, 400, "validation_error", "behavior"),
    ({"behavior": "allow", "message": "x" * 10_001}, 400, "validation_error", "message"),
    ({"behavior": "allow", "updated_input": "rm -rf /"}, 400, "validation_error", "updated_input"),
    ({"behavior": "allow", "remember": "yes please"}, 400, "validation_error", "remember"),
    ({"behavior": "allow", "why": "because"}, 400, "validation_error", "why"),
    ({"behavior": "allow", "updated_input": {"command": "a\x00b"}}, 400, "validation_error", "updated_input"),
    ({"behavior": "deny", "updated_input": {"command": "ls"}}, 422, "invalid_answer", "updated_input"),
    ({"behavior": "deny", "remember": True}, 422, "invalid_answer", "remember"),
])
def test_bad_answers_are_refused_naming_the_field_and_change_nothing(client, auth, db, owner, body, status, code,
                                                                     field):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    resp = client.post(answer_url(tid, approval.request_id), headers=auth(owner), json=body)
    assert resp.status_code == status, resp.get_json()
    err = error_of(resp)
    assert err["code"] == code and err["field"] == field and err["message"]
    assert row(db, approval.id).status == "pending"


def test_a_body_that_is_not_json_is_a_400(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    resp = client.post(answer_url(tid, approval.request_id), headers={**auth(owner), "Content-Type": "application/json"},
                       data="{behavior: allow")
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"


def test_remember_adds_the_suggested_rules_to_the_session_once(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    first, second = ask(db, sid, tid), ask(db, sid, tid)
    plain = ask(db, sid, tid, tool="WebFetch", input={"url": "https://example.com"}, suggestions=None)
    for approval in (first, second, plain):
        resp = client.post(answer_url(tid, approval.request_id), headers=auth(owner),
                           json={"behavior": "allow", "remember": True})
        assert resp.status_code == 200 and resp.get_json()["decision"]["remember"] is True
    with transaction(db) as s:
        assert s.get(Session, uuid.UUID(sid)).approval_rules == ["Bash(rm -rf build)", "WebFetch"]
    # Claude Code keeps them for the rest of its process too.
    assert approvals.control_answer(row(db, first.id))["updatedPermissions"] == SUGGESTIONS
    assert approvals.control_answer(row(db, plain.id))["updatedPermissions"] == [
        {"type": "addRules", "rules": [{"toolName": "WebFetch"}], "behavior": "allow", "destination": "session"}]
    [event, *_] = events_of(client, auth(owner), sid, "approval.resolved")
    assert event["data"]["remember"] is True


def test_rules_come_from_allow_suggestions_only_else_the_tool_name(db, owner):
    sid, tid = running_turn(db, owner)
    mixed = [{"type": "addRules", "behavior": "deny", "rules": [{"toolName": "Bash", "ruleContent": "rm *"}]},
             {"type": "setMode", "mode": "acceptEdits"},
             {"type": "addRules", "behavior": "allow", "rules": [{"toolName": "Bash", "ruleContent": "npm test"},
                                                                  {"toolName": "Read"}, {"ruleContent": "x"}]}]
    assert approvals.rules_of(ask(db, sid, tid, suggestions=mixed)) == ["Bash(npm test)", "Read"]
    assert approvals.rules_of(ask(db, sid, tid, suggestions=mixed[:2])) == ["Bash"]


def test_the_turn_shows_its_pending_approvals_until_they_are_answered(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    first, second = ask(db, sid, tid), ask(db, sid, tid)
    turn = client.get(f"/api/v1/turns/{tid}", headers=auth(owner)).get_json()
    assert [a["request_id"] for a in turn["pending_approvals"]] == [first.request_id, second.request_id]
    assert turn["pending_approvals"][0]["input"] == BASH and turn["pending_approvals"][0]["status"] == "pending"
    assert turn["links"]["approvals"] == f"/api/v1/turns/{tid}/approvals"
    client.post(answer_url(tid, first.request_id), headers=auth(owner), json={"behavior": "allow"})
    turn = client.get(f"/api/v1/turns/{tid}", headers=auth(owner)).get_json()
    assert [a["request_id"] for a in turn["pending_approvals"]] == [second.request_id]
    listed = client.get(f"/api/v1/turns/{tid}/approvals", headers=auth(owner)).get_json()["approvals"]
    assert [(a["request_id"], a["status"]) for a in listed] == [(first.request_id, "allowed"),
                                                                (second.request_id, "pending")]
    session = client.get(f"/api/v1/sessions/{sid}", headers=auth(owner)).get_json()
    assert [a["request_id"] for a in session["latest_turn"]["pending_approvals"]] == [second.request_id]


def test_a_page_of_turns_reads_their_pending_approvals_in_one_query(app, client, auth, db, owner):
    sid, _ = running_turn(db, owner)
    for seq in range(2, 6):
        _, tid = running_turn(db, owner, seq=seq, session_id=sid)
        ask(db, sid, tid)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(statement)

    engine = app.extensions["ccd"].engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        page = client.get(f"/api/v1/sessions/{sid}/turns", headers=auth(owner)).get_json()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert [len(t["pending_approvals"]) for t in page["items"]] == [0, 1, 1, 1, 1]
    assert len([s for s in statements if "approvals" in s]) == 1, "\n".join(statements)


def test_open_approval_is_idempotent_and_keeps_an_answer(db, owner):
    sid, tid = running_turn(db, owner)
    first = ask(db, sid, tid, request_id="toolu_same")
    with transaction(db) as s:
        approvals.resolve(s, owner=owner, turn_id=tid, request_id="toolu_same", behavior="allow", decided_by=owner,
                          via="rest")
    again = ask(db, sid, tid, request_id="toolu_same", input={"command": "other"})
    assert again.id == first.id and again.status == "allowed" and again.input == BASH
    with transaction(db) as s:
        assert len(approvals.pending(s, tid)) == 0
        assert len(s.scalars(select(Approval).where(Approval.turn_id == uuid.UUID(tid))).all()) == 1


def test_time_out_denies_a_pending_approval_past_its_deadline_only(client, auth, db, owner):
    sid, tid = running_turn(db, owner)
    due = ask(db, sid, tid, deadline_in=-1)
    not_due = ask(db, sid, tid, deadline_in=600)
    with transaction(db) as s:
        assert approvals.time_out(s, tid, not_due.request_id) is None
        timed_out = approvals.time_out(s, tid, due.request_id)
        assert timed_out is not None and timed_out.status == "timed_out" and timed_out.resolved_at
        answer = approvals.control_answer(timed_out)
        event = approvals.resolved_event(timed_out, 1)
        assert approvals.time_out(s, tid, due.request_id) is None  # once
        assert [a.request_id for a in approvals.pending(s, tid)] == [not_due.request_id]
    assert answer["behavior"] == "deny" and "deadline" in answer["message"]
    assert event.type == "approval.resolved" and event.data["status"] == "timed_out"
    assert event.data["via"] == "timeout" and event.data["behavior"] == "deny" and event.data["decided_by"] is None
    late = client.post(answer_url(tid, due.request_id), headers=auth(owner), json={"behavior": "allow"})
    assert late.status_code == 409 and error_of(late)["code"] == "approval_resolved"
    # An answered one is not timed out after its deadline either.
    answered = ask(db, sid, tid, deadline_in=-1)
    with transaction(db) as s:
        approvals.resolve(s, owner=owner, turn_id=tid, request_id=answered.request_id, behavior="allow",
                          decided_by=owner, via="rest")
    with transaction(db) as s:
        assert approvals.time_out(s, tid, answered.request_id) is None
        assert approvals.time_out(s, tid, "toolu_unknown") is None


def test_control_answer_without_an_edit_runs_the_input_claude_code_asked_for(db, owner):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    with transaction(db) as s:
        resolved = approvals.resolve(s, owner=owner, turn_id=tid, request_id=approval.request_id, behavior="allow",
                                     decided_by=owner, via="websocket")
        assert approvals.control_answer(resolved) == {"behavior": "allow", "updatedInput": BASH}
    with pytest.raises(NotFound), transaction(db) as s:
        approvals.resolve(s, owner="someone-else", turn_id=tid, request_id=approval.request_id, behavior="allow",
                          decided_by="someone-else", via="rest")


def test_the_requested_event_is_an_envelope_clients_decode(db, owner):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    event = approvals.requested_event(approval, 3)
    decoded = Event.decode("1-0", event.to_fields())
    assert decoded.type == "approval.requested" and decoded.turn_id == tid and decoded.seq == 3
    assert decoded.data["deadline"].endswith("Z") and decoded.data["request_id"] == approval.request_id
    assert {k: decoded.data[k] for k in ("tool_name", "input", "suggestions")} == {
        "tool_name": "Bash", "input": BASH, "suggestions": SUGGESTIONS}


@pytest.fixture(scope="module")
def web(api_settings):
    """A real gunicorn serving this run's API (no worker: nothing it queues is consumed)."""
    port = stack.free_port()
    env = stack.service_env(api_settings, "127.0.0.1", "http://127.0.0.1:9", port, WEB_WORKERS="1")
    process = stack.start_web(env, port, name="web-approvals")
    yield f"ws://127.0.0.1:{port}"
    process.stop()


def replies(ws, until_type: str, timeout: float = 10) -> list[dict]:
    """Frames from the socket until one of `until_type` (a reply, or an event type), that one included."""
    frames, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = json.loads(ws.recv())
        frames.append(frame)
        if frame["type"] == until_type:
            return frames
    raise AssertionError(f"no {until_type} within {timeout} s: {frames}")


def test_the_websocket_approve_command_answers_and_the_socket_sees_the_resolution(web, token, db, owner,
                                                                                 api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    ws = websocket.create_connection(f"{web}/api/v1/sessions/{sid}/stream?token={token(owner)}", timeout=10)
    try:
        ws.send(json.dumps({"type": "approve", "id": "a1", "turn_id": tid, "request_id": approval.request_id,
                            "behavior": "allow", "updated_input": {"command": "ls"}}))
        frames = replies(ws, "reply")
        assert frames[-1]["id"] == "a1" and frames[-1]["ok"] is True, frames[-1]
        assert frames[-1]["approval"]["status"] == "allowed"
        assert frames[-1]["approval"]["decision"]["via"] == "websocket"
        resolved = [f for f in frames if f["type"] == "approval.resolved"] or replies(ws, "approval.resolved")[-1:]
        assert resolved[0]["data"]["via"] == "websocket" and resolved[0]["data"]["updated_input"] == {"command": "ls"}
        ws.send(json.dumps({"type": "approve", "id": "a2", "turn_id": tid, "request_id": approval.request_id,
                            "behavior": "deny"}))
        again = replies(ws, "reply")[-1]
        assert again["ok"] is False and again["error"]["code"] == "approval_resolved"
        ws.send(json.dumps({"type": "approve", "id": "a3", "turn_id": tid, "request_id": "x", "behavior": "nah"}))
        bad = replies(ws, "reply")[-1]
        assert bad["ok"] is False and bad["error"]["code"] == "validation_error"
    finally:
        ws.close()
    assert signals(api_settings, tid) == ["answer"]
    assert row(db, approval.id).status == "allowed"


def test_a_session_tokens_websocket_may_not_approve(web, db, owner, api_settings):
    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    agent = mint_session_token(api_settings.jwt_secret, owner, sid, 600)
    ws = websocket.create_connection(f"{web}/api/v1/sessions/{sid}/stream?token={agent}", timeout=10)
    try:
        ws.send(json.dumps({"type": "approve", "turn_id": tid, "request_id": approval.request_id,
                            "behavior": "allow"}))
        reply = replies(ws, "reply")[-1]
    finally:
        ws.close()
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    assert row(db, approval.id).status == "pending"


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.stop()


@pytest.fixture
def service(api_settings):
    from workers.context import ServiceContext

    context = ServiceContext(api_settings)
    yield context
    context.engine.dispose()


def test_an_approval_request_is_posted_signed_to_the_turns_webhook_once(service, receiver, db, owner):
    from workers.webhooks import deliver

    sid, tid = running_turn(db, owner, webhook=receiver.url)
    approval = ask(db, sid, tid)
    assert (approval.webhook, approval.webhook_status) == (receiver.url, "pending")
    assert deliver(service, "approval", str(approval.id), 1) == "delivered"
    [(status, headers, body)] = receiver.calls
    assert verify(service.settings.webhook_secret, headers["CCD-Signature"], body)
    assert headers["CCD-Event"] == "approval.requested" and headers["CCD-Delivery"] == str(approval.id)
    payload = json.loads(body)
    assert {k: payload[k] for k in ("event", "turn_id", "session_id")} == {
        "event": "approval.requested", "turn_id": tid, "session_id": sid}
    assert payload["approval"]["request_id"] == approval.request_id and payload["approval"]["input"] == BASH
    assert payload["approval"]["status"] == "pending"
    assert row(db, approval.id).webhook_status == "delivered"
    # A worker that re-attaches asks for the delivery again: it is not posted twice.
    assert deliver(service, "approval", str(approval.id), 1) == "skipped"
    assert len(receiver.calls) == 1


def test_an_approval_of_a_turn_without_a_webhook_posts_nothing(service, receiver, db, owner):
    from workers.webhooks import deliver

    sid, tid = running_turn(db, owner)
    approval = ask(db, sid, tid)
    assert approval.webhook is None and approval.webhook_status is None
    assert deliver(service, "approval", str(approval.id), 1) == "skipped"
    assert receiver.calls == []


def test_a_refused_approval_webhook_is_retried_like_a_turns(service, db, owner):
    from workers.webhooks import deliver

    failing = Receiver(status=500)
    try:
        sid, tid = running_turn(db, owner, webhook=failing.url)
        approval = ask(db, sid, tid)
        assert deliver(service, "approval", str(approval.id), 1) == "retry"
        stored = row(db, approval.id)
        assert (stored.webhook_status, stored.webhook_attempts, stored.webhook_claimed_until) == ("pending", 1, None)
        assert deliver(service, "approval", str(approval.id), service.settings.webhook_max_attempts) == "failed"
        assert row(db, approval.id).webhook_status == "failed"
    finally:
        failing.stop()
