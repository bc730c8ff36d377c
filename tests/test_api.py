"""The HTTP API against real Postgres and Redis: validation, ownership, auth, paging, states."""
import time

import jwt
import pytest

JSON = {"Content-Type": "application/json"}
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def create(client, headers, body=None):
    return client.post("/api/v1/sessions", json=body if body is not None else {}, headers=headers)


def error_of(resp):
    body = resp.get_json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_healthz_needs_no_token(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_create_returns_201_with_defaults_and_links(client, auth, api_settings):
    resp = create(client, auth(), {"workspace": {"type": "ephemeral"}, "config": {"model": "claude-x"}})
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["status"] == "creating" and body["owner"] == "alice"
    assert body["config"]["model"] == "claude-x"
    assert body["config"]["limits"] == {"memory_mb": 2048, "cpus": 1.0, "pids": 512,
                                        "disk_mb": api_settings.disk_mb_default}
    assert resp.headers["Location"] == f"/api/v1/sessions/{body['id']}"
    assert body["links"]["chat"] == f"/api/v1/sessions/{body['id']}/chat"


@pytest.mark.parametrize("body,field", [
    ({"config": {"model": 5}}, "config.model"),
    ({"config": {"limits": {"memory_mb": 1}}}, "config.limits.memory_mb"),
    ({"config": {"permission_mode": "yolo"}}, "config.permission_mode"),
    ({"config": {"allowed_tools": ["Bash,Edit"]}}, "config.allowed_tools"),
    ({"workspace": {"type": "nfs"}}, "workspace.type"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_session_specs_name_the_field(client, auth, body, field):
    resp = create(client, auth(), body)
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["code"] == "validation_error" and err["field"] == field
    assert err["message"].startswith(field)


def test_a_disk_limit_over_the_ceiling_is_a_422_naming_the_field_and_the_ceiling(client, auth, api_settings):
    ceiling = api_settings.max_disk_mb
    resp = create(client, auth(), {"config": {"limits": {"disk_mb": ceiling + 1}}})
    assert resp.status_code == 422
    err = error_of(resp)
    assert err["code"] == "limit_exceeded" and err["field"] == "config.limits.disk_mb" and err["limit"] == ceiling
    assert str(ceiling) in err["message"] and "CCD_MAX_DISK_MB" in err["message"]
    parent = create(client, auth(), {"config": {"limits": {"disk_mb": ceiling}}})
    assert parent.status_code == 201 and parent.get_json()["config"]["limits"]["disk_mb"] == ceiling
    spawn = client.post(f"/api/v1/sessions/{parent.get_json()['id']}/spawn", headers={**auth(), **JSON},
                        json={"config": {"limits": {"disk_mb": ceiling * 2}}})
    assert spawn.status_code == 422 and error_of(spawn)["field"] == "config.limits.disk_mb"
    assert create(client, auth(), {"config": {"limits": {"disk_mb": 1}}}).status_code == 400  # below 10 MB
    batch = client.post("/api/v1/batches", headers={**auth(), **JSON},
                        json={"items": [{"prompt": "hi", "config": {"limits": {"disk_mb": ceiling + 1}}}]})
    assert batch.status_code == 422 and error_of(batch)["field"] == "items[0].config.limits.disk_mb"


def test_malformed_json_is_a_400_not_a_500(client, auth):
    resp = client.post("/api/v1/sessions", data="{not json", headers={**auth(), **JSON})
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"
    resp = client.post("/api/v1/sessions", data="[1, 2]", headers={**auth(), **JSON})
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"


def test_non_json_content_type_is_refused(client, auth):
    resp = client.post("/api/v1/sessions", data="prompt=hi", headers={**auth(), "Content-Type": "text/plain"})
    assert resp.status_code == 400 and error_of(resp)["code"] == "unsupported_media_type"


def test_body_over_the_limit_is_413(client, auth, settings):
    big = {"prompt": "x" * (settings.max_body_bytes + 10)}
    sid = create(client, auth()).get_json()["id"]
    resp = client.post(f"/api/v1/sessions/{sid}/chat", json=big, headers=auth())
    assert resp.status_code == 413 and error_of(resp)["code"] == "too_large"


@pytest.mark.parametrize("body,field", [({}, "prompt"), ({"prompt": ""}, "prompt"),
                                        ({"prompt": "   "}, "prompt"), ({"prompt": 7}, "prompt"),
                                        ({"prompt": "hi", "extra": True}, "extra")])
def test_chat_validates_the_prompt(client, auth, body, field):
    sid = create(client, auth()).get_json()["id"]
    resp = client.post(f"/api/v1/sessions/{sid}/chat", json=body, headers=auth())
    assert resp.status_code == 400 and error_of(resp)["field"] == field


def test_chat_queues_turns_with_gap_free_seq(client, auth):
    sid = create(client, auth()).get_json()["id"]
    seqs = []
    for n in range(3):
        resp = client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": f"hello {n}"}, headers=auth())
        assert resp.status_code == 202
        turn = resp.get_json()
        assert turn["status"] == "queued" and turn["links"]["self"] == f"/api/v1/turns/{turn['id']}"
        seqs.append(turn["seq"])
    assert seqs == [1, 2, 3]
    listed = client.get(f"/api/v1/sessions/{sid}/turns?limit=2", headers=auth()).get_json()
    assert [t["seq"] for t in listed["items"]] == [1, 2] and listed["total"] == 3 and listed["next_offset"] == 2
    detail = client.get(f"/api/v1/sessions/{sid}", headers=auth()).get_json()
    assert detail["latest_turn"]["seq"] == 3 and detail["turn_count"] == 3


def test_unknown_and_malformed_ids_are_404(client, auth):
    for path in ("/api/v1/sessions/5b6f7c1e-0000-4000-8000-000000000000", "/api/v1/sessions/not-a-uuid",
                 "/api/v1/turns/5b6f7c1e-0000-4000-8000-000000000000", "/api/v1/turns/xyz"):
        resp = client.get(path, headers=auth())
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


def test_another_owners_session_and_turns_are_invisible(client, auth):
    sid = create(client, auth("alice")).get_json()["id"]
    tid = client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "mine"}, headers=auth("alice")).get_json()["id"]
    mallory = auth("mallory")
    calls = [("get", f"/api/v1/sessions/{sid}", None), ("post", f"/api/v1/sessions/{sid}/chat", {"prompt": "x"}),
             ("get", f"/api/v1/sessions/{sid}/turns", None), ("get", f"/api/v1/turns/{tid}", None),
             ("post", f"/api/v1/sessions/{sid}/stop", None), ("delete", f"/api/v1/sessions/{sid}", None),
             ("get", f"/api/v1/sessions/{sid}/stream", None)]
    for method, path, body in calls:
        headers = {**mallory, **UPGRADE} if path.endswith("/stream") else mallory
        resp = getattr(client, method)(path, json=body, headers=headers)
        assert resp.status_code == 404, (method, path, resp.status_code)
    listed = client.get("/api/v1/sessions", headers=mallory).get_json()
    assert sid not in [s["id"] for s in listed["items"]]
    # ...and nothing mallory did changed alice's session.
    assert client.get(f"/api/v1/sessions/{sid}", headers=auth("alice")).get_json()["turn_count"] == 1


def test_list_filters_by_status_and_pages(client, auth):
    owner = auth("pager")
    ids = [create(client, owner).get_json()["id"] for _ in range(3)]
    client.post(f"/api/v1/sessions/{ids[0]}/stop", headers=owner)
    page1 = client.get("/api/v1/sessions?limit=2", headers=owner).get_json()
    page2 = client.get("/api/v1/sessions?limit=2&offset=2", headers=owner).get_json()
    assert page1["total"] == 3 and len(page1["items"]) == 2 and len(page2["items"]) == 1
    assert {s["id"] for s in page1["items"] + page2["items"]} == set(ids)
    stopping = client.get("/api/v1/sessions?status=stopping", headers=owner).get_json()
    assert [s["id"] for s in stopping["items"]] == [ids[0]]


@pytest.mark.parametrize("qs,field", [("limit=0", "query.limit"), ("limit=abc", "query.limit"),
                                      ("status=sleepy", "query.status"), ("offset=-1", "query.offset")])
def test_bad_query_parameters_are_400(client, auth, qs, field):
    resp = client.get(f"/api/v1/sessions?{qs}", headers=auth())
    assert resp.status_code == 400 and error_of(resp)["field"] == field


def test_deleted_session_refuses_chat_with_409(client, auth):
    sid = create(client, auth()).get_json()["id"]
    client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "queued"}, headers=auth())
    resp = client.delete(f"/api/v1/sessions/{sid}", headers=auth())
    assert resp.status_code == 202 and resp.get_json()["status"] == "stopping"
    resp = client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "too late"}, headers=auth())
    assert resp.status_code == 409 and error_of(resp)["code"] == "wrong_state"
    turns = client.get(f"/api/v1/sessions/{sid}/turns", headers=auth()).get_json()["items"]
    assert [t["status"] for t in turns] == ["cancelled"]


def test_tokens_are_checked_on_every_api_endpoint(client, settings):
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, settings.jwt_secret, algorithm="HS256")
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    cases = [({}, "missing_token"), ({"Authorization": f"Bearer {expired}"}, "token_expired"),
             ({"Authorization": f"Bearer {unsigned}"}, "invalid_token"),
             ({"Authorization": "Basic YWxpY2U6eA=="}, "missing_token")]
    for headers, code in cases:
        for method, path in (("get", "/api/v1/sessions"), ("post", "/api/v1/sessions"),
                             ("get", "/api/v1/turns/5b6f7c1e-0000-4000-8000-000000000000")):
            resp = getattr(client, method)(path, headers=headers)
            assert resp.status_code == 401 and error_of(resp)["code"] == code, (headers, path)


def test_stream_takes_the_token_from_the_query_and_checks_since(client, auth, token):
    sid = create(client, auth()).get_json()["id"]
    resp = client.get(f"/api/v1/sessions/{sid}/stream?token=garbage", headers=UPGRADE)
    assert resp.status_code == 401
    resp = client.get(f"/api/v1/sessions/{sid}/stream?token={token()}&since=yesterday", headers=UPGRADE)
    assert resp.status_code == 400 and error_of(resp)["field"] == "since"
    resp = client.get(f"/api/v1/sessions/{sid}/stream?token={token()}")
    assert resp.status_code == 400 and error_of(resp)["code"] == "websocket_required"
    # ?token= is for the WebSocket only: REST endpoints ignore it.
    assert client.get(f"/api/v1/sessions/{sid}?token={token()}").status_code == 401


def test_unknown_route_and_method_are_json_errors(client, auth):
    assert error_of(client.get("/api/v1/nothing", headers=auth()))["code"] == "not_found"
    resp = client.put("/api/v1/sessions", headers=auth())
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"
