"""Limits on everything a client controls, against a real gunicorn web process with small limits:
body size (with Content-Length and chunked), prompt length, batch size, page size, upload size,
sessions per owner, WebSocket message size. Each over-limit request gets 413/422/429 with a JSON
reason: never a 500, never a hang (every request here has a timeout)."""
from __future__ import annotations

import json
import os
import struct
import uuid

import pytest
import requests
from sqlalchemy import create_engine, text

from client.tokens import mint_token
from tests import stack

LIMITS = {"CCD_MAX_BODY_BYTES": 4096, "CCD_MAX_PROMPT_CHARS": 1000, "CCD_MAX_BATCH_BYTES": 65536,
          "CCD_MAX_UPLOAD_BYTES": 8192, "CCD_OWNER_MAX_SESSIONS": 2}
TIMEOUT = 30


def limited_web(api_settings, storage_dir, limits: dict, name: str, processes: int = 1) -> tuple[str, stack.Process]:
    """gunicorn serving the app with these settings over the run's; no worker consumes its queues."""
    port = stack.free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CCD_", "JWT_"))},
           "JWT_SECRET": api_settings.jwt_secret, "DATABASE_URL": api_settings.database_url,
           "REDIS_URL": api_settings.redis_url, "CCD_KEY_PREFIX": api_settings.key_prefix,
           "CCD_STORAGE_DIR": str(storage_dir), "CCD_PORT": str(port), **{k: str(v) for k, v in limits.items()}}
    return f"127.0.0.1:{port}", stack.start_web(env, port, name=name, processes=processes)


@pytest.fixture(scope="module")
def server(api_settings, tmp_path_factory):
    """gunicorn serving the app with the small LIMITS."""
    host, web = limited_web(api_settings, tmp_path_factory.mktemp("limits-storage"), LIMITS, "web-limits")
    yield host
    web.stop()


class Api:
    """requests against the server, as one owner."""

    def __init__(self, host: str, secret: str, owner: str) -> None:
        self.base, self.owner = f"http://{host}/api/v1", owner
        self.token = mint_token(secret, owner, 600)
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def __call__(self, method: str, path: str, headers: dict | None = None, **kwargs) -> requests.Response:
        return requests.request(method, self.base + path, headers={**self.headers, **(headers or {})},
                                timeout=TIMEOUT, **kwargs)

    def session(self) -> str:
        resp = self("POST", "/sessions", json={})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]


@pytest.fixture
def api(server, api_settings):
    return Api(server, api_settings.jwt_secret, f"limits-{uuid.uuid4().hex[:8]}")


def error_of(resp: requests.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


def chunked(data: bytes, size: int = 1024):
    """A generator body: requests sends it chunked, without Content-Length."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


# -- body size: every endpoint that reads JSON, with Content-Length and chunked ---------------------

JSON_ENDPOINTS = {  # endpoint: (method, path, limit)
    "create_session": ("POST", "/sessions", "CCD_MAX_BODY_BYTES"),
    "chat": ("POST", "/sessions/{sid}/chat", "CCD_MAX_BODY_BYTES"),
    "spawn": ("POST", "/sessions/{sid}/spawn", "CCD_MAX_BODY_BYTES"),
    "revoke_token": ("POST", "/tokens/revoke", "CCD_MAX_BODY_BYTES"),
    "create_batch": ("POST", "/batches", "CCD_MAX_BATCH_BYTES"),
    # The body is read (and refused) before the turn is looked up.
    "answer_approval": ("POST", "/turns/00000000-0000-4000-8000-000000000000/approvals/r1", "CCD_MAX_BODY_BYTES"),
}


def test_json_endpoints_are_all_in_the_table(app):
    """A new route that reads a JSON body must join JSON_ENDPOINTS (found by its use of json_body/json_data)."""
    import inspect

    readers = {name.split(".", 1)[1] for name, view in app.view_functions.items()
               if "json_body(" in inspect.getsource(view) or "read_submission(" in inspect.getsource(view)}
    assert readers == set(JSON_ENDPOINTS)


@pytest.mark.parametrize("transfer", ["content_length", "chunked"])
@pytest.mark.parametrize("endpoint", sorted(JSON_ENDPOINTS))
def test_body_over_the_limit_is_413_json(api, endpoint, transfer):
    method, path, limit_name = JSON_ENDPOINTS[endpoint]
    sid = api.session() if "{sid}" in path else None
    body = json.dumps({"prompt": "x" * (LIMITS[limit_name] + 100)}).encode()
    data = body if transfer == "content_length" else chunked(body)
    resp = api(method, path.format(sid=sid), data=data, headers={"Content-Type": "application/json"})
    err = error_of(resp, 413, "too_large")
    assert err["limit"] == LIMITS[limit_name]


def test_body_just_under_the_limit_passes(api):
    """The control: the limit is where it says, not lower."""
    sid = api.session()
    prompt = "x" * LIMITS["CCD_MAX_PROMPT_CHARS"]
    assert api("POST", f"/sessions/{sid}/chat", data=chunked(json.dumps({"prompt": prompt}).encode()),
               headers={"Content-Type": "application/json"}).status_code == 202


@pytest.mark.parametrize("transfer", ["content_length", "chunked"])
def test_the_limit_is_exact_for_chunked_bodies_too(api, transfer):
    """A body of exactly CCD_MAX_BODY_BYTES passes and one byte more is 413 (werkzeug alone would cut a
    chunked body at the limit and hand on the truncated part)."""
    sid = api.session()
    limit = LIMITS["CCD_MAX_BODY_BYTES"]
    exact = json.dumps({"prompt": "at the limit"}).encode()
    exact = exact[:-1] + b" " * (limit - len(exact)) + b"}"  # JSON whitespace pads it to the byte
    assert len(exact) == limit
    for body, status in ((exact, 202), (exact[:-1] + b" }", 413)):
        data = body if transfer == "content_length" else chunked(body)
        resp = api("POST", f"/sessions/{sid}/chat", data=data, headers={"Content-Type": "application/json"})
        assert resp.status_code == status, (len(body), resp.text[:300])


def test_a_chunked_ndjson_batch_past_the_limit_is_refused_not_cut(api):
    """Cut at the limit, an NDJSON batch could still parse, with fewer items than were sent."""
    line = json.dumps({"prompt": "x", "config": {}}).encode() + b"\n"
    lines = line * (LIMITS["CCD_MAX_BATCH_BYTES"] // len(line) + 1)
    assert LIMITS["CCD_MAX_BATCH_BYTES"] < len(lines) < LIMITS["CCD_MAX_BATCH_BYTES"] + len(line)
    resp = api("POST", "/batches", data=chunked(lines, 4096), headers={"Content-Type": "application/x-ndjson"})
    error_of(resp, 413, "too_large")
    assert api("GET", "/batches").json()["total"] == 0


# -- prompt length, batch size, page size, sessions per owner ------------------------------------

def over_prompt() -> str:
    return "y" * (LIMITS["CCD_MAX_PROMPT_CHARS"] + 1)


def test_prompt_over_the_limit_is_413_wherever_a_prompt_goes(api):
    sid = api.session()
    err = error_of(api("POST", f"/sessions/{sid}/chat", json={"prompt": over_prompt()}), 413, "prompt_too_long")
    assert err["field"] == "prompt" and str(LIMITS["CCD_MAX_PROMPT_CHARS"]) in err["message"]
    error_of(api("POST", f"/sessions/{sid}/spawn", json={"prompt": over_prompt()}), 413, "prompt_too_long")
    items = [{"prompt": "fine", "session_id": sid}, {"prompt": over_prompt(), "session_id": sid}]
    err = error_of(api("POST", "/batches", json={"items": items}), 413, "prompt_too_long")
    assert err["field"] == "items[1].prompt"
    # Nothing was queued by any of them.
    assert api("GET", f"/sessions/{sid}/turns").json()["total"] == 0
    assert api("GET", f"/sessions/{sid}/children").json()["items"] == []
    assert api("GET", "/batches").json()["total"] == 0


def test_batch_over_10000_items_is_413(api):
    err = error_of(api("POST", "/batches", json=[{}] * 10_001), 413, "too_many_items")
    assert err["field"] == "items"
    ndjson = b"{}\n" * 10_001
    error_of(api("POST", "/batches", data=ndjson, headers={"Content-Type": "application/x-ndjson"}),
             413, "too_many_items")
    assert api("GET", "/batches").json()["total"] == 0


@pytest.mark.parametrize("path,cap", [("/sessions", 200), ("/batches", 200), ("/sessions/{sid}/turns", 200),
                                      ("/sessions/{sid}/events", 1000), ("/sessions/{sid}/events?tree=true", 1000)])
def test_page_size_over_its_cap_is_422_naming_the_cap(api, path, cap):
    url = path.format(sid=api.session() if "{sid}" in path else None)
    joiner = "&" if "?" in url else "?"
    err = error_of(api("GET", f"{url}{joiner}limit={cap + 1}"), 422, "page_too_large")
    assert err["field"] == "query.limit" and str(cap) in err["message"]
    assert api("GET", f"{url}{joiner}limit={cap}").status_code == 200  # the cap itself is allowed
    assert api("GET", f"{url}{joiner}limit=99999999999999999999").status_code == 422


def test_sessions_past_the_owner_limit_are_429(api):
    first, _ = api.session(), api.session()
    for path, body in (("/sessions", {}), (f"/sessions/{first}/spawn", {})):
        resp = api("POST", path, json=body)
        err = error_of(resp, 429, "session_limit")
        assert err["limit"] == LIMITS["CCD_OWNER_MAX_SESSIONS"] and int(resp.headers["Retry-After"]) > 0
    assert api("GET", "/sessions").json()["total"] == LIMITS["CCD_OWNER_MAX_SESSIONS"]


# -- uploads -----------------------------------------------------------------------------------

@pytest.fixture
def reachable_session(api, api_settings):
    """A session as a worker leaves it once placed (a host queue set), so uploads get as far as
    reading the body; no worker consumes that queue, so nothing runs."""
    sid = api.session()
    engine = create_engine(api_settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE sessions SET host_queue = :q WHERE id = :id"),
                     {"q": f"{api_settings.key_prefix}.host.nowhere", "id": sid})
    engine.dispose()
    return sid


@pytest.mark.parametrize("transfer", ["content_length", "chunked"])
@pytest.mark.parametrize("path", ["/sessions/{sid}/workspace/files/big.bin", "/sessions/{sid}/workspace"])
def test_upload_over_the_limit_is_413(api, reachable_session, path, transfer):
    blob = os.urandom(LIMITS["CCD_MAX_UPLOAD_BYTES"] * 3)
    data = blob if transfer == "content_length" else chunked(blob, 4096)
    method = "PUT" if "files" in path else "POST"
    resp = api(method, path.format(sid=reachable_session), data=data,
               headers={"Content-Type": "application/octet-stream"})
    error_of(resp, 413, "upload_too_large")


# -- WebSocket ---------------------------------------------------------------------------------

def close_code(ws) -> int:
    """Reads frames until the server's close frame; its status code."""
    import websocket

    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0]


def test_websocket_prompt_and_message_limits(server, api):
    import websocket

    sid = api.session()
    url = f"ws://{server}/api/v1/sessions/{sid}/stream?token={api.token}"
    ws = websocket.create_connection(url, timeout=TIMEOUT)
    try:
        ws.send(json.dumps({"type": "chat", "prompt": over_prompt(), "id": "c1"}))
        while True:
            frame = json.loads(ws.recv())
            if frame.get("type") == "reply":
                break
        assert frame["id"] == "c1" and frame["ok"] is False and frame["error"]["code"] == "prompt_too_long"
        ws.send("z" * (LIMITS["CCD_MAX_BODY_BYTES"] + 1))  # one message over the body limit ends the socket
        assert close_code(ws) == 1009
    finally:
        ws.close()
    assert api("GET", f"/sessions/{sid}/turns").json()["total"] == 0
