"""The model proxy (real Postgres for its session checks): it swaps a session credential for the real key,
streams the answer through untouched, and refuses bad credentials, calls Claude Code does not make, sessions
that are ended or have no turn running, and spent budgets; it listens nowhere by default but where it is told,
closes idle connections and turns away a client that holds too many."""
from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from client.tokens import mint_token
from core.db import make_engine, make_session_factory, transaction
from core.errors import ConfigError
from core.models import Session, Turn
from core.session_tokens import mint_session_token
from tests.model_server import ModelServer
from workers.model_proxy import (AUDIENCE, SESSION_CLAIM, _signing_key, build_server, mint_model_credential,
                                 start_in_thread)

REAL_KEY = "sk-real-key-for-the-proxy-test"
CHUNKS = [b"event: message_start\ndata: {\"type\": \"message_start\"}\n\n",
          b"event: content_block_delta\ndata: {\"delta\": \"h\\u00e9llo\"}\n\n",
          b"event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n"]


class Upstream:
    """A stand-in model endpoint that records what reached it and streams CHUNKS, holding the last one
    back until `release` is set: a client that sees the first chunks before that got them unbuffered."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.release = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("request-id", "req_fixed")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, chunk in enumerate(CHUNKS):
                    if i == len(CHUNKS) - 1:
                        upstream.release.wait(30)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/base"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def db(settings):
    engine = make_engine(settings)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(settings, upstream):
    """The proxy in this process, its database check against the run's real database."""
    server = build_server(replace(settings, anthropic_api_key=REAL_KEY, anthropic_base_url=upstream.url),
                          "127.0.0.1", 0)
    start_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def new_session(db, status: str = "busy", config: dict | None = None, cost: str = "0",
                turns: tuple[str, ...] = ("running",)) -> str:
    """A session row with turns in these states (by default one running, as during a turn)."""
    with transaction(db) as s:
        row = Session(owner="proxy-owner", config=config or {}, workspace={}, status=status,
                      claude_session_id=uuid.uuid4(), cost_usd=Decimal(cost))
        s.add(row)
        s.flush()
        row.root_id = row.id
        for seq, turn_status in enumerate(turns, 1):
            s.add(Turn(session_id=row.id, seq=seq, prompt="p", status=turn_status))
        return str(row.id)


def post(url: str, headers: dict[str, str], body: bytes = b'{"stream": true}', path: str = "/v1/messages"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
    return conn, conn.getresponse()


def test_a_session_credential_is_swapped_for_the_real_key_and_the_stream_arrives_as_it_is_sent(
        db, proxy, upstream, settings):
    sid = new_session(db)
    credential = mint_model_credential(settings.jwt_secret, sid, 60)
    upstream.release.clear()
    before = len(upstream.seen)
    conn, resp = post(proxy.url, {"x-api-key": credential, "anthropic-version": "2023-06-01"},
                      body=b'{"model": "m", "stream": true}', path="/v1/messages?beta=true")
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    assert resp.getheader("request-id") == "req_fixed"
    received = b""
    while len(received) < len(CHUNKS[0]) + len(CHUNKS[1]):  # the last chunk is still held back upstream
        received += resp.read1(65536)
    assert received == CHUNKS[0] + CHUNKS[1]
    upstream.release.set()
    received += resp.read()
    conn.close()
    assert received == b"".join(CHUNKS)
    seen = upstream.seen[before]
    assert seen["path"] == "/base/v1/messages?beta=true" and seen["body"] == b'{"model": "m", "stream": true}'
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-api-key"] == REAL_KEY and "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"


def test_a_bearer_credential_works_too(db, proxy, upstream, settings):
    upstream.release.set()
    sid = new_session(db)
    conn, resp = post(proxy.url, {"Authorization": f"Bearer {mint_model_credential(settings.jwt_secret, sid, 60)}"})
    assert resp.status == 200 and resp.read() == b"".join(CHUNKS)
    conn.close()
    headers = {k.lower(): v for k, v in upstream.seen[-1]["headers"].items()}
    assert headers["x-api-key"] == REAL_KEY and "authorization" not in headers


def test_the_messages_api_stream_is_the_same_bytes_through_the_proxy(db, settings):
    model = ModelServer("127.0.0.1", 0).start()
    server = build_server(replace(settings, anthropic_api_key=REAL_KEY, anthropic_base_url=model.url),
                          "127.0.0.1", 0)
    start_in_thread(server)
    try:
        body = json.dumps({"model": "m", "stream": True, "tools": [{"name": "Bash"}],
                           "messages": [{"role": "user", "content": "SAY: one two three"}]}).encode()
        _, direct = post(model.url, {"x-api-key": "anything"}, body)
        sid = new_session(db)
        _, proxied = post(server.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)}, body)
        assert (direct.status, proxied.status) == (200, 200)
        raw_direct, raw_proxied = direct.read(), proxied.read()
        # Only the message id differs between two answers of the scripted server.
        same = re.compile(rb'"msg_[0-9a-f]+"')
        assert same.sub(b"MSG", raw_proxied) == same.sub(b"MSG", raw_direct)
        assert b'"text": "three"' in raw_proxied and raw_proxied.count(b"event: ") == raw_direct.count(b"event: ") > 5
    finally:
        server.shutdown()
        server.server_close()
        model.stop()


def forged(secret: str, sid: str, **changes) -> str:
    """A model credential with some claim or the key changed."""
    claims = {"aud": AUDIENCE, "sub": sid, SESSION_CLAIM: sid, "iat": int(time.time()), "exp": int(time.time()) + 60}
    claims.update(changes)
    return jwt.encode(claims, _signing_key(secret), algorithm="HS256")


def test_anything_but_a_valid_session_credential_is_refused_before_it_reaches_the_model(db, proxy, upstream,
                                                                                      settings):
    upstream.release.set()
    sid = new_session(db)
    secret = settings.jwt_secret
    before = len(upstream.seen)
    cases = {
        "none": {},
        "garbage": {"x-api-key": "sk-not-a-credential"},
        "the real key itself": {"x-api-key": REAL_KEY},
        "an API token": {"Authorization": f"Bearer {mint_token(secret, 'proxy-owner', 60)}"},
        "a session token": {"x-api-key": mint_session_token(secret, "proxy-owner", sid, 60)},
        "another secret": {"x-api-key": mint_model_credential("another-secret", sid, 60)},
        "expired": {"x-api-key": forged(secret, sid, exp=int(time.time()) - 5)},
        "wrong audience": {"x-api-key": forged(secret, sid, aud="ccd")},
        "alg none": {"x-api-key": jwt.encode({"aud": AUDIENCE, SESSION_CLAIM: sid, "exp": int(time.time()) + 60},
                                             None, algorithm="none")},
    }
    for name, headers in cases.items():
        conn, resp = post(proxy.url, headers)
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 401, (name, resp.status, body)
        assert body == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": "invalid or expired session credential"}}, name
        assert resp.getheader("x-should-retry") == "false"
    assert len(upstream.seen) == before


def test_an_ended_unknown_or_over_budget_session_is_refused(db, proxy, upstream, settings):
    upstream.release.set()
    before = len(upstream.seen)
    cases = [
        (new_session(db, status="stopped"), 403, "permission_error"),
        (new_session(db, status="stopping"), 403, "permission_error"),
        (new_session(db, status="failed"), 403, "permission_error"),
        (new_session(db, status="deleted"), 403, "permission_error"),
        (str(uuid.uuid4()), 403, "permission_error"),
        (new_session(db, config={"max_budget_usd": 0.01}, cost="0.02"), 402, "billing_error"),
    ]
    for sid, status, kind in cases:
        conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)})
        body = json.loads(resp.read())
        conn.close()
        assert (resp.status, body["error"]["type"]) == (status, kind), (sid, body)
    assert len(upstream.seen) == before
    # Within its budget the same kind of session goes through.
    sid = new_session(db, config={"max_budget_usd": 1}, cost="0.02")
    conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)})
    assert resp.status == 200 and resp.read() == b"".join(CHUNKS)
    conn.close()


def test_a_model_credential_is_no_api_token(client, api_settings):
    sid = str(uuid.uuid4())
    resp = client.get(f"/api/v1/sessions/{sid}",
                      headers={"Authorization": f"Bearer {mint_model_credential(api_settings.jwt_secret, sid, 60)}"})
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_token"


def test_health_answers_without_a_credential_and_reaches_nothing_upstream(proxy, upstream):
    before = len(upstream.seen)
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})
    conn.request("POST", "/healthz", body=b"{}")  # only GET /healthz is the check; the rest needs a credential
    resp = conn.getresponse()
    assert resp.status == 401 and resp.read()
    conn.close()
    assert len(upstream.seen) == before


def refusal(url: str, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict]:
    """Sends `target` exactly as written (http.client normalises nothing) and reads the JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, target, body=b'{"model": "m"}', headers={"content-type": "application/json", **headers})
    resp = conn.getresponse()
    body = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, body


FORBIDDEN = [("GET", "/v1/models"), ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file_1/content"),
             ("DELETE", "/v1/files/file_1"), ("POST", "/v1/messages/batches"), ("GET", "/v1/messages/batches"),
             ("POST", "/v1/messages/batches/msgbatch_1/cancel"), ("GET", "/v1/messages"), ("PUT", "/v1/messages"),
             ("DELETE", "/v1/messages"), ("OPTIONS", "/v1/messages"), ("HEAD", "/v1/messages"),
             ("POST", "/v1/messages/../files"), ("POST", "//v1/files"), ("POST", "/v1/messages/%2e%2e/files"),
             ("POST", "/v1/messages/%2E%2E/batches"), ("POST", "/v1//messages"), ("POST", "/v1/messages/"),
             ("POST", "/v1/%6Dessages"), ("POST", "/v1/messages/count_tokens/../../files"),
             ("POST", "http://127.0.0.1/v1/files"), ("POST", "/v1/messages?beta=false"),
             ("POST", "/v1/messages?beta=true&beta=true"), ("POST", "/v1/messages?beta=true&x=1"),
             ("POST", "/v1/messages?x=/v1/files"), ("POST", "/v1/messages#/v1/files"), ("POST", "/v1/complete"),
             ("POST", "/v1/organizations/api_keys"), ("POST", "/healthz")]


def test_only_the_calls_claude_code_makes_reach_the_model_and_the_rest_are_refused_naming_the_session(
        db, proxy, upstream, settings, caplog):
    upstream.release.set()
    sid = new_session(db)
    headers = {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)}
    before = len(upstream.seen)
    with caplog.at_level(logging.INFO, logger="workers.model_proxy"):
        for method, target in FORBIDDEN:
            status, body = refusal(proxy.url, method, target, headers)
            assert status == 403, (method, target, status, body)
            if method != "HEAD":  # a HEAD answer has no body to read
                assert body["type"] == "error" and body["error"]["type"] == "permission_error", (target, body)
                assert "forwards only POST /v1/messages and POST /v1/messages/count_tokens" in body["error"]["message"]
    assert len(upstream.seen) == before  # none of them reached the model
    refused = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == len(FORBIDDEN) and all(sid in r.getMessage() for r in refused), refused[:3]
    assert "'/v1/files'" in refused[1].getMessage()
    # What Claude Code sends goes through, to the same path under the upstream's.
    for target in ("/v1/messages?beta=true", "/v1/messages", "/v1/messages/count_tokens?beta=true",
                   "/v1/messages/count_tokens", "/v1/messages?beta=%74rue"):
        conn, resp = post(proxy.url, headers, path=target)
        assert resp.status == 200, target
        resp.read()
        conn.close()
    assert [seen["path"] for seen in upstream.seen[before:]] == [
        "/base/v1/messages?beta=true", "/base/v1/messages", "/base/v1/messages/count_tokens?beta=true",
        "/base/v1/messages/count_tokens", "/base/v1/messages?beta=true"]


def test_without_a_credential_a_forbidden_call_is_still_an_authentication_error(proxy, upstream):
    before = len(upstream.seen)
    status, body = refusal(proxy.url, "GET", "/v1/files", {})
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    assert len(upstream.seen) == before


def test_a_credential_reaches_the_model_only_while_its_session_has_a_turn_running(db, proxy, upstream, settings):
    upstream.release.set()
    before = len(upstream.seen)
    for turns in ((), ("succeeded",), ("queued",), ("succeeded", "failed", "cancelled", "timed_out", "queued")):
        sid = new_session(db, status="ready", turns=turns)
        conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)})
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 403 and body["error"]["type"] == "permission_error", (turns, body)
        assert body["error"]["message"] == (f"session {sid} has no turn running; its credential reaches the model "
                                            "only during a turn"), body
    assert len(upstream.seen) == before
    # The same session, once one of its turns runs, gets through; once it has ended, no longer.
    with transaction(db) as s:
        turn = s.scalars(Turn.__table__.select().where(Turn.session_id == uuid.UUID(sid),
                                                       Turn.status == "queued")).first()
        s.execute(Turn.__table__.update().where(Turn.id == turn).values(status="running"))
    credential = {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)}
    conn, resp = post(proxy.url, credential)
    assert resp.status == 200 and resp.read() == b"".join(CHUNKS)
    conn.close()
    with transaction(db) as s:
        s.execute(Turn.__table__.update().where(Turn.id == turn).values(status="succeeded"))
    conn, resp = post(proxy.url, credential)
    assert resp.status == 403 and "has no turn running" in json.loads(resp.read())["error"]["message"]
    conn.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "[::]", "0"])
def test_the_proxy_will_not_listen_on_every_address_unless_told_it_may(settings, host):
    with pytest.raises(ConfigError, match="CCD_MODEL_PROXY_ALLOW_ANY_ADDRESS=true") as caught:
        build_server(settings, host, 0, gate=lambda *claims: None)
    assert "would listen on every address" in caught.value.message


def test_the_proxy_listens_on_every_address_when_the_setting_allows_it(settings):
    server = build_server(replace(settings, model_proxy_allow_any_address=True), "0.0.0.0", 0,
                          gate=lambda *claims: None)
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.server_close()


def test_python_m_workers_proxy_refuses_every_address_and_says_what_to_set(settings):
    env = {"JWT_SECRET": settings.jwt_secret, "DATABASE_URL": settings.database_url, "CCD_MODEL_PROXY_HOST": "0.0.0.0",
           "CCD_MODEL_PROXY_PORT": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "workers", "proxy"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "would listen on every address ('0.0.0.0')" in proc.stderr and "CCD_MODEL_PROXY_HOST" in proc.stderr


@pytest.fixture
def small_proxy(settings, upstream):
    """A proxy that closes a connection after 1 s without a byte and lets a client hold 3 connections."""
    server = build_server(replace(settings, anthropic_api_key=REAL_KEY, anthropic_base_url=upstream.url,
                                  model_proxy_idle_seconds=1, model_proxy_client_connections=3), "127.0.0.1", 0)
    start_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(server.server_address)
    return sock


def closed_after(sock: socket.socket) -> tuple[float, bytes]:
    """How long until the server closed the connection, and what it sent before."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return time.monotonic() - started, data


def test_an_idle_connection_and_a_stalled_request_are_closed_after_the_idle_time(small_proxy):
    opened = time.monotonic()
    idle, stalled = connect(small_proxy), connect(small_proxy)
    stalled.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")  # headers begun, never finished
    for sock in (idle, stalled):
        _, data = closed_after(sock)
        assert 0.9 < time.monotonic() - opened < 5 and data == b"", (time.monotonic() - opened, data)
        sock.close()
    wait_until_released(small_proxy, "127.0.0.1")


def wait_until_released(server, client: str) -> None:
    deadline = time.monotonic() + 10
    while server.open_connections(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_connections(client) == 0


def test_a_stream_that_pauses_upstream_is_not_cut_by_the_idle_time(db, small_proxy, upstream, settings):
    upstream.release.clear()
    sid = new_session(db)
    conn, resp = post(small_proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)})
    assert resp.status == 200
    time.sleep(2.5)  # the model holds the last chunk back longer than the idle time
    upstream.release.set()
    assert resp.read() == b"".join(CHUNKS)
    conn.close()


def test_a_client_over_its_connection_share_is_turned_away_at_once_and_others_are_not(db, small_proxy, upstream,
                                                                                      settings, caplog):
    upstream.release.set()
    held = [connect(small_proxy) for _ in range(3)]
    deadline = time.monotonic() + 5
    while small_proxy.open_connections("127.0.0.1") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    with caplog.at_level(logging.WARNING, logger="workers.model_proxy"):
        extra = [connect(small_proxy) for _ in range(20)]
        for sock in extra:
            waited, data = closed_after(sock)
            assert waited < 0.5, waited  # turned away at once, not after the idle time
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 ") and b"Connection: close" in head, data
            error = json.loads(body)["error"]
            assert error["type"] == "rate_limit_error" and "CCD_MODEL_PROXY_CLIENT_CONNECTIONS" in error["message"]
            sock.close()
    assert len([r for r in caplog.records if "turning away" in r.getMessage()]) == 1  # a flood is one log line
    # Another client (another container's address) still gets through with a real request.
    sid = new_session(db)
    other = connect(small_proxy, source="127.0.0.2")
    request = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nx-api-key: "
               + mint_model_credential(settings.jwt_secret, sid, 60).encode() + b"\r\n\r\n{}")
    other.sendall(request)
    answer = b""
    while b"message_stop" not in answer:
        answer += other.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    other.close()
    # Once the held connections go, the first client has its share again.
    for sock in held:
        sock.close()
    wait_until_released(small_proxy, "127.0.0.1")
    again = connect(small_proxy)
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert again.recv(65536).startswith(b"HTTP/1.1 200 ")
    again.close()
