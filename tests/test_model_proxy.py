"""The model proxy (real Postgres for its session checks): it swaps a session credential for the real key,
streams the answer through untouched, and refuses bad credentials, ended sessions and spent budgets."""
from __future__ import annotations

import http.client
import json
import re
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
from core.models import Session
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


def new_session(db, status: str = "ready", config: dict | None = None, cost: str = "0") -> str:
    with transaction(db) as s:
        row = Session(owner="proxy-owner", config=config or {}, workspace={}, status=status,
                      claude_session_id=uuid.uuid4(), cost_usd=Decimal(cost))
        s.add(row)
        s.flush()
        row.root_id = row.id
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
