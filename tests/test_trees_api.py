"""Spawn trees, session tokens, persistent workspace holds and file-path checks through the API
(real Postgres and Redis, no worker: containers are never started here)."""
import json
import secrets
import uuid

import pytest
from sqlalchemy import create_engine, func, select, update

from core.models import Session, Turn
from core.session_tokens import mint_session_token
from tests.test_api import create, error_of


@pytest.fixture(scope="module")
def db(api_settings):
    engine = create_engine(api_settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def owner_auth(auth):
    """Headers of a fresh owner, so counts and limits start from zero."""
    name = f"tree-{secrets.token_hex(3)}"
    return auth(name)


def spawn(client, headers, sid, body=None):
    return client.post(f"/api/v1/sessions/{sid}/spawn", json=body or {}, headers=headers)


def chain(client, headers, length):
    """A root and `length` generations below it; returns their ids, root first."""
    ids = [create(client, headers, {"config": {"model": "m-root"}}).get_json()["id"]]
    for _ in range(length):
        resp = spawn(client, headers, ids[-1])
        assert resp.status_code == 201, resp.get_json()
        ids.append(resp.get_json()["id"])
    return ids


def test_spawn_makes_a_child_that_inherits_config_and_queues_its_first_prompt(client, owner_auth):
    root = create(client, owner_auth, {"config": {"model": "m-root", "append_system_prompt": "be brief"}}).get_json()
    resp = spawn(client, owner_auth, root["id"], {"prompt": "hello child", "config": {"model": "m-child"}})
    assert resp.status_code == 201
    child = resp.get_json()
    assert child["parent_id"] == root["id"] and child["depth"] == 1 and child["status"] == "creating"
    assert child["config"]["model"] == "m-child"  # overridden
    assert child["config"]["append_system_prompt"] == "be brief"  # inherited
    assert child["turn"]["status"] == "queued" and child["turn"]["prompt"] == "hello child"
    assert child["turn"]["session_id"] == child["id"]
    bare = spawn(client, owner_auth, root["id"]).get_json()
    assert bare["turn"] is None and bare["config"]["model"] == "m-root"


def test_spawn_is_refused_past_the_depth_limit_and_nothing_is_created(client, owner_auth, api_settings, db):
    ids = chain(client, owner_auth, api_settings.max_spawn_depth)
    with db.connect() as conn:
        before = conn.scalar(select(func.count()).select_from(Session))
    resp = spawn(client, owner_auth, ids[-1], {"prompt": "one too deep"})
    assert resp.status_code == 409
    assert error_of(resp)["code"] == "spawn_depth_exceeded"
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Session)) == before


def test_spawn_is_refused_past_the_child_limit(client, owner_auth, api_settings):
    root = create(client, owner_auth).get_json()["id"]
    for _ in range(api_settings.max_children):
        assert spawn(client, owner_auth, root).status_code == 201
    resp = spawn(client, owner_auth, root)
    assert resp.status_code == 409 and error_of(resp)["code"] == "too_many_children"


def test_spawn_rejects_a_bad_config_override(client, owner_auth):
    root = create(client, owner_auth).get_json()["id"]
    resp = spawn(client, owner_auth, root, {"config": {"limits": {"memory_mb": 1}}})
    assert resp.status_code == 400 and error_of(resp)["field"].startswith("config")


def test_children_and_the_recursive_tree(client, owner_auth):
    ids = chain(client, owner_auth, 2)
    sibling = spawn(client, owner_auth, ids[0]).get_json()["id"]
    direct = client.get(f"/api/v1/sessions/{ids[0]}/children", headers=owner_auth).get_json()["items"]
    assert {c["id"] for c in direct} == {ids[1], sibling}
    tree = client.get(f"/api/v1/sessions/{ids[0]}/children?recursive=true", headers=owner_auth).get_json()
    by_id = {node["id"]: node for node in tree["items"]}
    assert set(by_id) == {ids[1], sibling}
    assert [n["id"] for n in by_id[ids[1]]["children"]] == [ids[2]]
    assert by_id[sibling]["children"] == [] and tree["tree_cost_usd"] == 0.0


def test_stopping_a_session_stops_its_descendants_and_cancels_their_queued_turns(client, owner_auth, db):
    ids = chain(client, owner_auth, 2)
    turn = spawn(client, owner_auth, ids[1], {"prompt": "queued below"}).get_json()["turn"]
    assert client.post(f"/api/v1/sessions/{ids[0]}/stop", headers=owner_auth).status_code == 202
    with db.connect() as conn:
        statuses = dict(conn.execute(select(Session.id, Session.status)
                                     .where(Session.root_id == uuid.UUID(ids[0]))).all())
        assert set(statuses.values()) == {"stopping"} and len(statuses) == 4
        assert conn.scalar(select(Turn.status).where(Turn.id == uuid.UUID(turn["id"]))) == "cancelled"


def test_deleting_a_session_deletes_its_subtree_only(client, owner_auth):
    ids = chain(client, owner_auth, 2)
    assert client.delete(f"/api/v1/sessions/{ids[1]}", headers=owner_auth).status_code == 202
    statuses = [client.get(f"/api/v1/sessions/{i}", headers=owner_auth).get_json()["status"] for i in ids]
    assert statuses == ["creating", "stopping", "stopping"]


def test_the_tree_budget_refuses_new_turns_anywhere_in_the_tree_once_spent(client, owner_auth, db):
    root = create(client, owner_auth, {"config": {"max_budget_usd": 0.5}}).get_json()["id"]
    child = spawn(client, owner_auth, root).get_json()
    assert "max_budget_usd" not in child["config"] or child["config"]["max_budget_usd"] is None
    assert client.post(f"/api/v1/sessions/{child['id']}/chat", json={"prompt": "fine"},
                       headers=owner_auth).status_code == 202
    with db.begin() as conn:  # the child's turns cost what the root allowed
        conn.execute(update(Session).where(Session.id == uuid.UUID(child["id"])).values(cost_usd=0.5))
    for path, body in ((f"{root}/chat", {"prompt": "more"}), (f"{child['id']}/chat", {"prompt": "more"}),
                       (f"{root}/spawn", {"prompt": "more"})):
        resp = client.post(f"/api/v1/sessions/{path}", json=body, headers=owner_auth)
        assert resp.status_code == 402, (path, resp.get_json())
        assert error_of(resp)["code"] == "budget_exhausted"


def scoped(api_settings, owner, session_id):
    token = mint_session_token(api_settings.jwt_secret, owner, session_id, 600)
    return {"Authorization": f"Bearer {token}"}


def test_a_session_token_reaches_its_subtree_and_nothing_else(client, auth, api_settings):
    owner = f"tree-{secrets.token_hex(3)}"
    headers = auth(owner)
    root = create(client, headers).get_json()["id"]
    mid = spawn(client, headers, root).get_json()["id"]
    other = create(client, headers).get_json()["id"]
    token = scoped(api_settings, owner, mid)
    below = spawn(client, token, mid, {"prompt": "from the agent"})
    assert below.status_code == 201
    assert client.get(f"/api/v1/sessions/{below.get_json()['id']}", headers=token).status_code == 200
    assert client.get(f"/api/v1/turns/{below.get_json()['turn']['id']}", headers=token).status_code == 200
    assert client.get(f"/api/v1/sessions/{mid}/children", headers=token).status_code == 200
    for path in (f"/api/v1/sessions/{root}", f"/api/v1/sessions/{other}"):
        assert client.get(path, headers=token).status_code == 404, path
    assert client.post(f"/api/v1/sessions/{root}/spawn", json={}, headers=token).status_code == 404
    resp = client.get("/api/v1/sessions", headers=token)
    assert resp.status_code == 403 and error_of(resp)["code"] == "token_scope"
    assert client.post("/api/v1/batches", json={"items": [{"prompt": "x", "session_id": mid}]},
                       headers=token).status_code == 403
    client.post(f"/api/v1/sessions/{mid}/stop", headers=headers)
    resp = client.get(f"/api/v1/sessions/{mid}", headers=token)
    assert resp.status_code == 401 and error_of(resp)["code"] == "token_expired"


def test_a_persistent_workspace_is_held_by_one_live_session_at_a_time(client, owner_auth):
    name = f"ws-{secrets.token_hex(3)}"
    spec = {"workspace": {"type": "persistent", "name": name}}
    first = create(client, owner_auth, spec)
    assert first.status_code == 201 and first.get_json()["workspace"] == {"type": "persistent", "name": name}
    second = create(client, owner_auth, spec)
    assert second.status_code == 409 and error_of(second)["code"] == "workspace_in_use"
    other_name = create(client, owner_auth, {"workspace": {"type": "persistent", "name": name + "-b"}})
    assert other_name.status_code == 201


@pytest.mark.parametrize("workspace", [{"type": "persistent"}, {"type": "ephemeral", "name": "x"},
                                       {"type": "persistent", "name": "../up"}, {"type": "persistent", "name": ""}])
def test_bad_workspace_specs_are_refused(client, owner_auth, workspace):
    resp = create(client, owner_auth, {"workspace": workspace})
    assert resp.status_code == 400 and error_of(resp)["field"].startswith("workspace")


def test_file_paths_outside_the_workspace_are_refused_before_any_work(client, owner_auth):
    sid = create(client, owner_auth).get_json()["id"]
    for path in ("..%2Fetc%2Fpasswd", "a/../../b", "a/%2e%2e/%2e%2e/b", "/etc/passwd"):
        resp = client.get(f"/api/v1/sessions/{sid}/workspace/files/{path}", headers=owner_auth)
        assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_path", path


def test_file_requests_to_a_session_without_a_container_are_a_conflict(client, owner_auth):
    sid = create(client, owner_auth).get_json()["id"]
    resp = client.get(f"/api/v1/sessions/{sid}/workspace", headers=owner_auth)
    assert resp.status_code == 409 and error_of(resp)["code"] == "workspace_unavailable"


def test_an_upload_over_the_limit_is_413(client, owner_auth, api_settings, db):
    sid = create(client, owner_auth).get_json()["id"]
    with db.begin() as conn:  # as if a worker had started it
        conn.execute(update(Session).where(Session.id == uuid.UUID(sid)).values(status="ready", host_queue="nowhere"))
    body = b"x" * (api_settings.max_upload_bytes + 1)
    resp = client.put(f"/api/v1/sessions/{sid}/workspace/files/big.bin", data=body, headers=owner_auth)
    assert resp.status_code == 413 and error_of(resp)["code"] == "upload_too_large"


def test_a_retried_spawn_with_the_same_idempotency_key_makes_one_child(client, owner_auth):
    root = create(client, owner_auth).get_json()["id"]
    headers = {**owner_auth, "Idempotency-Key": secrets.token_hex(8)}
    first = spawn(client, headers, root, {"prompt": "once"})
    again = spawn(client, headers, root, {"prompt": "once"})
    assert first.status_code == again.status_code == 201
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["turn"]["id"] == first.get_json()["turn"]["id"]
    children = client.get(f"/api/v1/sessions/{root}/children", headers=owner_auth).get_json()["items"]
    assert len(children) == 1


def test_tree_events_merge_the_subtree_in_order_and_resume_exactly_once(client, owner_auth, api_settings):
    from core.envelope import Event
    from core.events import EventLog

    root = create(client, owner_auth).get_json()["id"]
    child = spawn(client, owner_auth, root).get_json()["id"]
    grandchild = spawn(client, owner_auth, child).get_json()["id"]
    outsider = create(client, owner_auth).get_json()["id"]
    log = EventLog.from_settings(api_settings)
    for i in range(7):
        for sid in (root, grandchild, child, outsider):
            log.publish(Event(session_id=sid, type="turn.queued", data={"n": i}))
    ours = {root, child, grandchild}

    seen, since = [], None
    while True:
        url = f"/api/v1/sessions/{root}/events?tree=true&limit=4" + (f"&since={since}" if since else "")
        page = client.get(url, headers=owner_auth).get_json()
        seen += page["items"]
        since = page["next_since"]
        if not page["has_more"]:
            break
    # Every event of the three sessions once, none of the outsider's.
    def key(sid, data):
        return sid, json.dumps(data, sort_keys=True)
    stored = sorted(key(sid, e.data) for sid in ours for e in log.read(sid))
    assert sorted(key(e["session_id"], e["data"]) for e in seen) == stored
    assert all(e["id"].startswith("tree.") for e in seen)
    # Merged in stream-id order: each session's events keep their order.
    for sid in ours:
        assert [e["data"]["n"] for e in seen if e["session_id"] == sid] == list(range(7))

    # Live SSE from the last cursor: the first frame is the one event published since, from any member.
    log.publish(Event(session_id=grandchild, type="turn.queued", data={"n": "late"}))
    resp = client.get(f"/api/v1/sessions/{root}/events?tree=true",
                      headers={**owner_auth, "Accept": "text/event-stream", "Last-Event-ID": since})
    first = None
    for chunk in resp.response:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        data = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        if data:
            first = json.loads(data[0])
            break
    resp.close()
    assert first["session_id"] == grandchild and first["data"] == {"n": "late"}
    bad = client.get(f"/api/v1/sessions/{root}/events?tree=true&since=1-0", headers=owner_auth)
    assert bad.status_code == 400 and error_of(bad)["field"] == "since"


def test_an_agent_cannot_spawn_a_child_more_capable_than_itself(client, auth, api_settings):
    owner = f"tree-{secrets.token_hex(3)}"
    headers = auth(owner)
    parent = create(client, headers, {"config": {"allowed_tools": ["Read", "Bash"],
                                                 "permission_mode": "default"}}).get_json()["id"]
    token = scoped(api_settings, owner, parent)
    for body in ({"workspace": {"type": "persistent", "name": "owners-project"}},
                 {"config": {"permission_mode": "bypassPermissions"}},
                 {"config": {"allowed_tools": ["Read", "Write"]}},
                 {"config": {"limits": {"memory_mb": 65536}}}):
        resp = spawn(client, token, parent, body)
        assert resp.status_code == 403 and error_of(resp)["code"] == "token_scope", body
    ok = spawn(client, token, parent, {"config": {"allowed_tools": ["Read"], "model": "m-small"}})
    assert ok.status_code == 201
    assert ok.get_json()["config"]["allowed_tools"] == ["Read"]
    assert ok.get_json()["config"]["permission_mode"] == "default"
    # The owner, with an ordinary token, may still do all of it.
    assert spawn(client, headers, parent, {"config": {"permission_mode": "bypassPermissions"}}).status_code == 201
