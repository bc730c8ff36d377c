"""How turns end, against real Postgres and Redis (no worker): every ending goes through core.turn_ends, records a
status and a reason of the enums, and cancels the approvals the turn still waited for."""
import secrets
import uuid

import pytest
from sqlalchemy import select, text

from core.claimed import ClaimedTurn
from core.db import make_engine, make_session_factory, transaction
from core.models import Approval, Turn, utcnow
from core.turn_ends import end_turn
from core.turn_states import Ending, TurnReason, TurnStatus
from core.turns import claim_turn
from tests.test_api import create


def owner_headers(auth) -> dict:
    return auth(f"ends-{secrets.token_hex(3)}")


def chat(client, headers, sid, prompt="hello") -> dict:
    resp = client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt}, headers=headers)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def final_events(client, headers, sid) -> list[dict]:
    page = client.get(f"/api/v1/sessions/{sid}/events", headers=headers).get_json()
    return [e for e in page["items"] if e["type"] != "turn.queued"]


@pytest.fixture(scope="module")
def db(api_settings):
    engine = make_engine(api_settings)
    yield make_session_factory(engine)
    engine.dispose()


def add_approvals(db, turn_id: str, session_id: str, statuses: dict[str, str]) -> None:
    """Approval rows for a turn: request id → status."""
    with transaction(db) as s:
        for request_id, status in statuses.items():
            s.add(Approval(turn_id=uuid.UUID(turn_id), session_id=uuid.UUID(session_id), request_id=request_id,
                           tool_name="Bash", input={"command": "ls"}, status=status,
                           resolved_at=None if status == "pending" else utcnow()))


def approvals_of(db, turn_id: str) -> dict[str, tuple[str, bool]]:
    """request id → (status, has resolved_at)."""
    with transaction(db) as s:
        rows = s.execute(select(Approval.request_id, Approval.status, Approval.resolved_at)
                         .where(Approval.turn_id == uuid.UUID(turn_id))).all()
    return {request_id: (status, resolved_at is not None) for request_id, status, resolved_at in rows}


def stored_ending(db, turn_id: str) -> tuple:
    """The turn's row as Postgres holds it (plain SQL: no enum or ORM in between)."""
    with transaction(db) as s:
        return s.execute(text("SELECT status, reason, error, finished_at, lease_holder FROM turns WHERE id = :id"),
                         {"id": turn_id}).one()


def test_a_cancelled_queued_turn_records_reason_cancelled_in_its_row_body_and_event(client, auth, db):
    who = owner_headers(auth)
    sid = create(client, who).get_json()["id"]
    turn = chat(client, who, sid)
    resp = client.post(f"/api/v1/turns/{turn['id']}/cancel", headers=who)
    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["status"], body["reason"], body["error"]) == ("cancelled", "cancelled", "cancelled by request")
    again = client.get(f"/api/v1/turns/{turn['id']}", headers=who).get_json()
    assert (again["status"], again["reason"]) == ("cancelled", "cancelled")
    [event] = final_events(client, who, sid)
    assert event["type"] == "turn.cancelled"
    assert event["data"] == {"status": "cancelled", "error": "cancelled by request", "reason": "cancelled"}
    status, reason, error, finished_at, lease_holder = stored_ending(db, turn["id"])
    assert (status, reason) == ("cancelled", "cancelled") and finished_at is not None and lease_holder is None


def test_stopping_a_session_ends_its_queued_turns_cancelled_with_reason_cancelled(client, auth, db):
    who = owner_headers(auth)
    sid = create(client, who).get_json()["id"]
    turns = [chat(client, who, sid, f"p{i}") for i in range(2)]
    add_approvals(db, turns[0]["id"], sid, {"r1": "pending"})
    assert client.post(f"/api/v1/sessions/{sid}/stop", headers=who).status_code == 202
    listed = client.get(f"/api/v1/sessions/{sid}/turns", headers=who).get_json()["items"]
    assert [(t["status"], t["reason"], t["error"]) for t in listed] == [
        ("cancelled", "cancelled", "session stopped")] * 2
    events = final_events(client, who, sid)
    assert [(e["type"], e["data"]["reason"]) for e in events if e["type"].startswith("turn.")] == [
        ("turn.cancelled", "cancelled")] * 2
    assert approvals_of(db, turns[0]["id"]) == {"r1": ("cancelled", True)}


def test_ending_a_turn_cancels_only_its_pending_approvals(client, auth, db):
    who = owner_headers(auth)
    sid = create(client, who).get_json()["id"]
    ended, other = chat(client, who, sid, "first"), chat(client, who, sid, "second")
    add_approvals(db, ended["id"], sid, {"asked": "pending", "yes": "allowed", "no": "denied"})
    add_approvals(db, other["id"], sid, {"waits": "pending"})
    assert client.post(f"/api/v1/turns/{ended['id']}/cancel", headers=who).status_code == 200
    assert approvals_of(db, ended["id"]) == {"asked": ("cancelled", True), "yes": ("allowed", True),
                                             "no": ("denied", True)}
    assert approvals_of(db, other["id"]) == {"waits": ("pending", False)}  # its turn is still queued


def test_a_claimed_turn_is_ended_only_under_its_own_attempt(client, auth, db):
    who = owner_headers(auth)
    sid = create(client, who).get_json()["id"]
    turn = chat(client, who, sid)
    with transaction(db) as s:
        claimed, session = claim_turn(s, turn["id"], "test-holder", 60)
    assert isinstance(claimed, ClaimedTurn) and claimed.attempt == 1 and not claimed.resumed
    assert (claimed.session_id, session.id, claimed.prompt) == (sid, sid, "hello")
    add_approvals(db, turn["id"], sid, {"r1": "pending"})
    ending = Ending(TurnStatus.FAILED, "the container could not run the turn", TurnReason.CONTAINER_ERROR)

    stale = ClaimedTurn(id=claimed.id, seq=claimed.seq, attempt=claimed.attempt - 1, session_id=sid)
    with transaction(db) as s:
        assert end_turn(s, stale, ending, result="never stored") is None
    assert stored_ending(db, turn["id"])[:2] == ("running", None)
    assert approvals_of(db, turn["id"]) == {"r1": ("pending", False)}

    with transaction(db) as s:
        event = end_turn(s, claimed, ending, result="partial")
    assert (event.type, event.turn_id, event.session_id, event.seq) == ("turn.failed", turn["id"], sid, claimed.seq)
    assert event.data == {"status": "failed", "error": ending.error, "reason": "container_error"}
    status, reason, error, finished_at, lease_holder = stored_ending(db, turn["id"])
    assert (status, reason, error) == ("failed", "container_error", ending.error)
    assert finished_at is not None and lease_holder is None
    with transaction(db) as s:
        assert s.get(Turn, uuid.UUID(turn["id"])).result == "partial"
    assert approvals_of(db, turn["id"]) == {"r1": ("cancelled", True)}
    with transaction(db) as s:  # ended once: a second ending (a late worker) changes nothing
        assert end_turn(s, claimed, Ending(TurnStatus.SUCCEEDED)) is None
    assert stored_ending(db, turn["id"])[:2] == ("failed", "container_error")


def test_every_status_and_reason_in_postgres_is_a_value_of_the_enums(db):
    """Run after the tests above (and any before them in this run): whatever ended turns wrote, Postgres holds
    plain strings that the enums name."""
    with transaction(db) as s:
        rows = s.execute(text("SELECT DISTINCT status, reason FROM turns")).all()
    assert {status for status, _ in rows} >= {"cancelled", "failed"}  # the endings above were written
    for status, reason in rows:
        assert type(status) is str and TurnStatus(status).value == status
        assert reason is None or TurnReason(reason).value == reason
