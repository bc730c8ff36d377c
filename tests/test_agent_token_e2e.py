"""An agent's session token stays inside its session: the token is taken from inside a real session
container (the agent's own Bash tool reads it from /proc) and used from a real HTTP and WebSocket client."""
from __future__ import annotations

import json
import re
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import websocket

from core.session_tokens import mint_session_token
from tests.conftest import wait_for
from tests.test_e2e import Api

pytestmark = pytest.mark.docker
OWNER = "agent-token-owner"
# What a hostile agent runs: every process of its container that holds the session token gives it away.
STEAL = "RUN: cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -m1 '^CCD_SESSION_TOKEN='"
TOKEN_LINE = re.compile(r"CCD_SESSION_TOKEN=([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)")


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER, 3600))


def stolen_session(api: Api) -> tuple[str, str]:
    """A new session, and the session token its agent read from inside its container."""
    sid = api.session()["id"]
    turn = api.finished_turn(api.chat(sid, STEAL)["id"], timeout=120)
    assert turn["status"] == "succeeded", turn
    found = TOKEN_LINE.search(turn["result"] or "")
    assert found, turn["result"]
    return sid, found.group(1)


@pytest.fixture(scope="module")
def agent(api):
    return stolen_session(api)


def as_agent(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Receiver:
    """A webhook receiver on loopback (where the test stack allows webhooks): records every request."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hits.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.close()


def ws_connect(stack_env, sid: str, token: str):
    return websocket.create_connection(f"{stack_env['ws']}/api/v1/sessions/{sid}/stream?token={token}",
                                       timeout=30)


def command(ws, message: dict, timeout: float = 30) -> dict:
    """Sends a command and returns its reply (events in between are skipped)."""
    ws.send(json.dumps(message))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the server's pings keep every read short of the socket's timeout
        frame = json.loads(ws.recv())
        if frame.get("type") == "reply" and frame.get("id") == message["id"]:
            return frame
    raise AssertionError(f"no reply to {message} within {timeout:.0f}s")


def close_of(ws, timeout: float = 30, replies: list | None = None) -> tuple[int, str]:
    """Reads frames until the server's close frame: its code and reason; command replies go in `replies`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()
        if opcode == websocket.ABNF.OPCODE_TEXT and replies is not None:
            message = json.loads(frame.data)
            if message.get("type") == "reply":
                replies.append(message)
    raise AssertionError(f"the socket was still open after {timeout:.0f}s")


def turns_of(api: Api, sid: str) -> list[dict]:
    return api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)["items"]


def test_the_agent_reads_a_session_token_scoped_to_its_own_session(stack_env, api, agent):
    sid, token = agent
    mine = requests.get(f"{stack_env['base']}/api/v1/sessions/{sid}", headers=as_agent(token), timeout=30)
    assert mine.status_code == 200 and mine.json()["id"] == sid
    other = api.session()["id"]
    theirs = requests.get(f"{stack_env['base']}/api/v1/sessions/{other}", headers=as_agent(token), timeout=30)
    assert theirs.status_code == 404


def test_an_agent_token_may_not_set_a_webhook_on_chat_batches_or_the_websocket(stack_env, api, agent, receiver):
    sid, token = agent
    before = len(turns_of(api, sid))
    resp = requests.post(f"{stack_env['base']}/api/v1/sessions/{sid}/chat", headers=as_agent(token), timeout=30,
                         json={"prompt": "SAY: exfiltrate", "webhook": receiver.url})
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "token_scope" and error["field"] == "webhook" and "webhook" in error["message"]

    resp = requests.post(f"{stack_env['base']}/api/v1/batches", headers=as_agent(token), timeout=30,
                         json={"items": [{"prompt": "SAY: exfiltrate", "session_id": sid}], "webhook": receiver.url})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "token_scope", resp.text

    # Spawn takes no webhook at all: the field is refused, and no child is made.
    resp = requests.post(f"{stack_env['base']}/api/v1/sessions/{sid}/spawn", headers=as_agent(token), timeout=30,
                         json={"prompt": "SAY: exfiltrate", "webhook": receiver.url})
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "webhook", resp.text
    assert api.call("GET", f"/api/v1/sessions/{sid}/children", 200)["items"] == []

    ws = ws_connect(stack_env, sid, token)
    try:
        reply = command(ws, {"type": "chat", "prompt": "SAY: exfiltrate", "webhook": receiver.url, "id": "w1"})
        assert reply["ok"] is False and reply["error"]["code"] == "token_scope", reply
        # The control: the same chat without a webhook is queued, on the same socket.
        reply = command(ws, {"type": "chat", "prompt": "SAY: fine", "id": "w2"})
        assert reply["ok"] is True, reply
    finally:
        ws.close()
    assert api.finished_turn(reply["turn"]["id"])["status"] == "succeeded"
    turns = turns_of(api, sid)
    assert len(turns) == before + 1 and all(t["webhook"] is None for t in turns)
    # The owner's token still sets one, and it is delivered: the receiver would have seen the agent's.
    owner_turn = api.call("POST", f"/api/v1/sessions/{sid}/chat", 202,
                          json={"prompt": "SAY: owner", "webhook": receiver.url})
    api.finished_turn(owner_turn["id"])
    wait_for(lambda: receiver.hits, 30, what="the owner's webhook")
    assert len(receiver.hits) == 1 and json.loads(receiver.hits[0])["id"] == owner_turn["id"]


def busy_session(api: Api) -> tuple[str, dict, dict]:
    """Another session of the same owner with a running turn and one queued behind it."""
    sid = api.session()["id"]
    running = api.chat(sid, "SLOW: 40")
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{running['id']}", 200)["status"] == "running", 120,
             what="the slow turn to start")
    queued = api.chat(sid, "SAY: behind")
    return sid, running, queued


def test_an_agent_token_cannot_cancel_a_turn_of_another_session(stack_env, api, agent):
    sid, token = agent
    other, running, queued = busy_session(api)
    try:
        for turn in (running, queued):
            resp = requests.post(f"{stack_env['base']}/api/v1/turns/{turn['id']}/cancel", headers=as_agent(token),
                                 timeout=30)
            assert resp.status_code == 404, resp.text
        ws = ws_connect(stack_env, sid, token)
        try:
            for n, turn in enumerate((running, queued)):
                reply = command(ws, {"type": "cancel", "turn_id": turn["id"], "id": f"c{n}"})
                assert reply["ok"] is False and reply["error"]["code"] == "wrong_session", reply
        finally:
            ws.close()
        time.sleep(2 * stack_env["settings"].cancel_grace_seconds)  # a cancel that got through would show by now
        assert api.call("GET", f"/api/v1/turns/{running['id']}", 200)["status"] == "running"
        assert api.call("GET", f"/api/v1/turns/{queued['id']}", 200)["status"] == "queued"
        assert api.call("GET", f"/api/v1/turns/{running['id']}", 200)["cancel_requested_at"] is None
    finally:
        api.call("POST", f"/api/v1/sessions/{other}/stop", 202)


def test_an_agent_socket_closes_when_its_token_is_revoked_and_refuses_the_next_command(stack_env, api):
    sid, token = stolen_session(api)
    ws = ws_connect(stack_env, sid, token)
    try:
        assert command(ws, {"type": "chat", "prompt": "SAY: before", "id": "b"})["ok"] is True
        api.call("POST", "/api/v1/tokens/revoke", 200, json={"token": token})
        ws.send(json.dumps({"type": "chat", "prompt": "SAY: after", "id": "a"}))  # before the next 2 s check
        replies: list[dict] = []
        code, reason = close_of(ws, replies=replies)
    finally:
        ws.close()
    assert code == 4401 and reason.startswith("token_revoked:"), (code, reason)
    # Answered (when the command came before the periodic check closed the socket) with the reason, never run.
    assert all(r["ok"] is False and r["error"]["code"] == "token_revoked" for r in replies), replies
    assert [t["prompt"] for t in turns_of(api, sid)].count("SAY: after") == 0


def test_an_agent_socket_closes_when_its_session_stops(stack_env, api):
    sid, token = stolen_session(api)
    ws = ws_connect(stack_env, sid, token)
    try:
        assert command(ws, {"type": "chat", "prompt": "SAY: hello", "id": "h"})["ok"] is True
        api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
        code, reason = close_of(ws)
    finally:
        ws.close()
    assert code == 4401 and reason == "token_expired: this session token ended with its session", (code, reason)
    # A new socket with the same token is refused at the handshake.
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        ws_connect(stack_env, sid, token)
    assert err.value.status_code == 401


def test_a_socket_closes_when_its_token_expires(stack_env, api, agent):
    sid, _ = agent
    # The worker's own minting (what the agent got), with a lifetime a test can wait out.
    settings = stack_env["settings"]
    short = mint_session_token(settings.jwt_secret, OWNER, sid, 4, settings.jwt_audience, settings.jwt_issuer)
    ws = ws_connect(stack_env, sid, short)
    opened = time.monotonic()
    try:
        code, reason = close_of(ws)
    finally:
        ws.close()
    assert code == 4401 and reason.startswith("token_expired:"), (code, reason)
    assert 3 < time.monotonic() - opened < 15
