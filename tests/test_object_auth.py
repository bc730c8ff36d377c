"""Object-level authorization: every route in the URL map that takes an id answers another owner 404.

The routes are read from app.url_map, not listed here, so a new route that takes an id and forgets
the owner check fails this test; a new route without an id must be named in NO_ID_ENDPOINTS.
"""
import itertools
import uuid

import pytest

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
# Routes without an id, each with why it has nothing of another owner's to reach.
NO_ID_ENDPOINTS = {
    "static": "Flask's static files: no owner data",
    "health.healthz": "liveness, no data",
    "health.readyz": "readiness of the service's dependencies, no owner data",
    "metrics.scrape": "Prometheus metrics: counts and timings across all owners, no ids or owner data",
    "docs.openapi_document": "the API's shape, no data",
    "console.index": "the console page: static, no data (it reads the API with the token pasted into it)",
    "console.static": "the console's script and stylesheet: no owner data",
    "docs.docs_page": "the documentation page, no data",
    "docs.docs_asset": "Swagger UI's static files, no data",
    "api.create_session": "creates for the caller",
    "api.list_sessions": "lists the caller's own (test_api checks another owner's are absent)",
    "api.create_batch": "creates for the caller; its items' session ids are checked (test_jobs_api)",
    "api.list_batches": "lists the caller's own",
    "api.revoke_token": "acts on the caller's tokens only (test_auth)",
}
# URL parameters that are not ids, and a value to fill them with.
OTHER_PARAMS = {"path": "notes/readme.txt", "request_id": "toolu_01abc"}
# Bodies for routes whose body is not a prompt: well-formed, so a 404 is about whose id it is, not the body.
BODIES = {"api.answer_approval": {"behavior": "allow"}}
# Query strings that take a route down another branch (streams, trees, long polls): each is walked too.
QUERY_VARIANTS = {
    "api.events": ["tree=true", "limit=5", "since=1732450000000-0"],
    "api.list_children": ["recursive=true"],
    "api.batch_results": ["follow=true"],
    "api.get_turn": ["wait=5"],
    "api.list_turns": ["limit=1"],
}
IDEMPOTENCY_KEY = "shared-key-owner-a-used"


def owner(tag: str) -> str:
    return f"objauth-{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def owned(client, auth):
    """Owner A with one of everything: a session, a turn, a child (spawned, with its first turn), a batch."""
    name = owner("a")
    a = auth(name)
    sid = client.post("/api/v1/sessions", json={}, headers=a).get_json()["id"]
    turn = client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "mine"},
                       headers={**a, "Idempotency-Key": IDEMPOTENCY_KEY})
    assert turn.status_code == 202, turn.get_json()
    child = client.post(f"/api/v1/sessions/{sid}/spawn", json={"prompt": "child's"}, headers=a)
    assert child.status_code == 201, child.get_json()
    batch = client.post("/api/v1/batches", json={"items": [{"prompt": "batched", "session_id": sid}]}, headers=a)
    assert batch.status_code == 202, batch.get_json()
    ids = {"session_id": [sid, child.get_json()["id"]],
           "turn_id": [turn.get_json()["id"], child.get_json()["turn"]["id"]],
           "batch_id": [batch.get_json()["id"]]}
    return name, a, ids


def snapshot(client, a, ids) -> dict:
    """What another owner must not be able to change: statuses, turn counts, children, batch counts."""
    state = {}
    for sid in ids["session_id"]:
        body = client.get(f"/api/v1/sessions/{sid}", headers=a).get_json()
        children = client.get(f"/api/v1/sessions/{sid}/children", headers=a).get_json()["items"]
        state[sid] = (body["status"], body["turn_count"], len(children))
    for tid in ids["turn_id"]:
        state[tid] = client.get(f"/api/v1/turns/{tid}", headers=a).get_json()["status"]
    for bid in ids["batch_id"]:
        body = client.get(f"/api/v1/batches/{bid}", headers=a).get_json()
        state[bid] = (body["status"], body["counts"])
    return state


def requests_for(rule, ids: dict):
    """Every (method, url, headers, body) that calls `rule` with A's ids: each method, each id, each variant."""
    from flask import current_app

    adapter = current_app.url_map.bind("localhost")
    params = sorted(rule.arguments)
    choices = [ids[p] if p in ids else [OTHER_PARAMS[p]] for p in params]
    for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
        for values in itertools.product(*choices):
            url = adapter.build(rule.endpoint, dict(zip(params, values, strict=True)), method=method)
            if rule.websocket:
                yield method, url, UPGRADE, None
                continue
            if method == "GET":
                yield method, url, {}, None
                yield method, url, {"Accept": "text/event-stream"}, None
                for qs in QUERY_VARIANTS.get(rule.endpoint, []):
                    yield method, f"{url}?{qs}", {}, None
                    yield method, f"{url}?{qs}", {"Accept": "text/event-stream"}, None
            else:
                body = BODIES.get(rule.endpoint, {"prompt": "mallory was here"})
                yield method, url, {}, body
                yield method, url, {"Idempotency-Key": IDEMPOTENCY_KEY}, body


def walk(app, client, mallory: dict, ids: dict) -> list[str]:
    """Calls every route of the URL map as `mallory` with A's ids; asserts each answers 404 (JSON)."""
    walked, skipped = [], []
    with app.app_context():
        rules = list(app.url_map.iter_rules())
        assert set(QUERY_VARIANTS) <= {r.endpoint for r in rules}, "QUERY_VARIANTS names a route that is gone"
        for rule in rules:
            id_params = [p for p in rule.arguments if p in ids or p.endswith("_id")]
            if not id_params:
                assert rule.endpoint in NO_ID_ENDPOINTS, (
                    f"{rule.rule} ({rule.endpoint}) is new and takes no id: add it to NO_ID_ENDPOINTS "
                    "with why no other owner's data is reachable through it")
                skipped.append(rule.endpoint)
                continue
            unknown = set(rule.arguments) - set(ids) - set(OTHER_PARAMS)
            assert not unknown, f"{rule.rule}: the walk does not know how to fill {unknown}; teach it"
            for method, url, headers, body in requests_for(rule, ids):
                resp = client.open(url, method=method, headers={**mallory, **headers}, json=body)
                where = (rule.endpoint, method, url, headers)
                assert resp.status_code == 404, (where, resp.status_code, resp.get_data()[:300])
                assert resp.mimetype == "application/json", where
                error = resp.get_json()["error"]
                assert error["code"] == "not_found" and error["message"], where
                walked.append(rule.endpoint)
    assert set(skipped) == set(NO_ID_ENDPOINTS), "NO_ID_ENDPOINTS names a route that is gone"
    return walked


def test_every_route_with_an_id_answers_another_owner_404(app, client, auth, owned):
    name, a, ids = owned
    before = snapshot(client, a, ids)
    walked = walk(app, client, auth(owner("b")), ids)
    assert {"api.stream", "api.put_file", "api.batch_results", "api.events", "api.spawn"} <= set(walked)
    # Nothing mallory sent changed anything of A's.
    assert snapshot(client, a, ids) == before


def test_a_new_route_without_the_owner_check_fails_the_walk(api_settings, auth, owned):
    """The walk is what guards new routes: one that forgets get_owned is caught without being listed."""
    from flask import g

    from web import create_app

    leaky = create_app(api_settings)

    @leaky.get("/api/v1/sessions/<session_id>/peek")
    def peek(session_id: str):
        return {"session_id": session_id, "viewer": g.get("owner")}

    with pytest.raises(AssertionError, match="peek"):
        walk(leaky, leaky.test_client(), auth(owner("b")), owned[2])


def test_owner_a_still_reaches_everything_walked(client, owned):
    """The control: the same ids work for their owner, so the 404s above are about ownership."""
    name, a, ids = owned
    for sid in ids["session_id"]:
        assert client.get(f"/api/v1/sessions/{sid}", headers=a).status_code == 200
        assert client.get(f"/api/v1/sessions/{sid}/events", headers=a).status_code == 200
    for tid in ids["turn_id"]:
        assert client.get(f"/api/v1/turns/{tid}", headers=a).status_code == 200
    for bid in ids["batch_id"]:
        assert client.get(f"/api/v1/batches/{bid}", headers=a).status_code == 200
