"""Token checks: HS256 only, `sub` and `exp` required, `nbf`, `aud`/`iss` when configured, revocation;
every bad token is a 401 with its reason on REST, the WebSocket handshake and SSE alike."""
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import replace
from types import SimpleNamespace

import jwt
import pytest
import redis

from client.tokens import mint_token
from core.errors import Unauthorized
from web.auth import decode_token

SECRET = "s" * 32


def test_minted_token_decodes_to_its_owner():
    claims = decode_token(mint_token(SECRET, "alice", 60), SECRET)
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize("make,code", [
    (lambda: mint_token(SECRET, "alice", 1, now=time.time() - 120), "token_expired"),
    (lambda: mint_token("another-secret-of-32-characters!", "alice", 60), "invalid_token"),
    (lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"), "invalid_token"),
    (lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"), "invalid_token"),
    (lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "invalid_token"),
    (lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"), "invalid_token"),
    (lambda: jwt.encode({"sub": "", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"), "invalid_token"),
    (lambda: "not.a.jwt", "invalid_token"),
])
def test_bad_tokens_are_refused(make, code):
    with pytest.raises(Unauthorized) as err:
        decode_token(make(), SECRET)
    assert err.value.code == code


def test_minting_refuses_empty_inputs():
    for args in (("", "alice", 60), (SECRET, "", 60), (SECRET, "alice", 0)):
        with pytest.raises(ValueError):
            mint_token(*args)


def test_ccd_token_command_prints_a_token_the_server_accepts(monkeypatch, capsys):
    from client.cli import main

    monkeypatch.setenv("JWT_SECRET", SECRET)
    assert main(["token", "--sub", "bob", "--ttl", "120"]) == 0
    claims = decode_token(capsys.readouterr().out.strip(), SECRET)
    assert claims["sub"] == "bob" and claims["exp"] - claims["iat"] == 120


def test_ccd_token_without_secret_explains_what_to_set(monkeypatch, capsys):
    from client.cli import main

    monkeypatch.delenv("JWT_SECRET", raising=False)
    assert main(["token"]) == 2
    assert "JWT_SECRET is not set" in capsys.readouterr().err


# -- every bad token, refused alike on REST, the WebSocket handshake and SSE ----------------------

AUDIENCE, ISSUER = "ccd-api", "ccd-test-issuer"
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(claims: dict, key: bytes) -> str:
    """HS256 with any bytes as the key: what an attacker does with a server's RSA public key
    (PyJWT itself refuses to use a PEM key as an HMAC secret)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


@pytest.fixture(scope="module")
def rsa_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


@pytest.fixture(scope="module")
def strict_app(api_settings):
    """The app with JWT_AUDIENCE and JWT_ISSUER set, so aud and iss are checked too."""
    from web import create_app

    return create_app(replace(api_settings, jwt_audience=AUDIENCE, jwt_issuer=ISSUER))


@pytest.fixture(scope="module")
def strict(strict_app, api_settings):
    """A test client, a token factory for the strict app, and a session of alice's to aim at."""
    secret = api_settings.jwt_secret
    client = strict_app.test_client()

    def good(sub="alice", **claims):
        now = int(time.time())
        return jwt.encode({"sub": sub, "iat": now, "exp": now + 600, "aud": AUDIENCE, "iss": ISSUER,
                           "jti": uuid.uuid4().hex, **claims}, secret, algorithm="HS256")

    resp = client.post("/api/v1/sessions", json={}, headers={"Authorization": f"Bearer {good()}"})
    assert resp.status_code == 201, resp.get_json()
    return SimpleNamespace(client=client, good=good, secret=secret, sid=resp.get_json()["id"])


def without(claims: dict, *names: str) -> dict:
    return {k: v for k, v in claims.items() if k not in names}


def revoked_token(s) -> str:
    token = s.good()
    resp = s.client.post("/api/v1/tokens/revoke", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and resp.get_json()["revoked"] is True
    return token


NOW = int(time.time())
BAD_TOKENS = {
    # name: (make(strict, rsa_key) -> token, expected code)
    "alg_none": (lambda s, k: jwt.encode(claims_of(s), None, algorithm="none"), "invalid_token"),
    "alg_none_with_signature": (lambda s, k: s.good().rsplit(".", 2)[0].replace(
        b64(b'{"alg":"HS256","typ":"JWT"}'), b64(b'{"alg":"none","typ":"JWT"}')) + ".", "invalid_token"),
    "wrong_key": (lambda s, k: jwt.encode(claims_of(s), "another-secret-of-32-characters!", algorithm="HS256"),
                  "invalid_token"),
    "other_hmac_alg": (lambda s, k: jwt.encode(claims_of(s), s.secret, algorithm="HS512"), "invalid_token"),
    "rs256": (lambda s, k: jwt.encode(claims_of(s), k[0], algorithm="RS256"), "invalid_token"),
    "hs256_with_public_key": (lambda s, k: hs256_by_hand(claims_of(s), k[1]), "invalid_token"),
    "tampered_sub": (lambda s, k: tamper(s.good("alice"), sub="mallory"), "invalid_token"),
    "expired": (lambda s, k: s.good(exp=int(time.time()) - 60), "token_expired"),
    "nbf_in_future": (lambda s, k: s.good(nbf=int(time.time()) + 600), "token_not_yet_valid"),
    "missing_exp": (lambda s, k: jwt.encode(without(claims_of(s), "exp"), s.secret, algorithm="HS256"),
                    "invalid_token"),
    "missing_sub": (lambda s, k: jwt.encode(without(claims_of(s), "sub"), s.secret, algorithm="HS256"),
                    "invalid_token"),
    "empty_sub": (lambda s, k: s.good(sub=""), "invalid_token"),
    "non_string_sub": (lambda s, k: jwt.encode({**claims_of(s), "sub": 42}, s.secret, algorithm="HS256"),
                       "invalid_token"),
    "wrong_aud": (lambda s, k: s.good(aud="someone-else"), "invalid_token"),
    "missing_aud": (lambda s, k: jwt.encode(without(claims_of(s), "aud"), s.secret, algorithm="HS256"),
                    "invalid_token"),
    "wrong_iss": (lambda s, k: s.good(iss="https://evil.example"), "invalid_token"),
    "missing_iss": (lambda s, k: jwt.encode(without(claims_of(s), "iss"), s.secret, algorithm="HS256"),
                    "invalid_token"),
    "non_string_jti": (lambda s, k: s.good(jti=12345), "invalid_token"),
    "revoked_jti": (lambda s, k: revoked_token(s), "token_revoked"),
    "garbage": (lambda s, k: "not.a.jwt", "invalid_token"),
}


def claims_of(s) -> dict:
    return jwt.decode(s.good(), options={"verify_signature": False})


def tamper(token: str, **changes) -> str:
    """The token with its payload changed and the original signature kept."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join((head, b64(json.dumps({**claims, **changes}).encode()), signature))


def call(s, transport: str, token: str, session_id: str | None = None):
    """One request with `token`, as a REST call, a WebSocket handshake, or an SSE subscription."""
    sid = session_id or s.sid
    if transport == "rest":
        return s.client.get(f"/api/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})
    if transport == "rest_post":
        return s.client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "hi"},
                             headers={"Authorization": f"Bearer {token}"})
    if transport == "ws_query":  # browsers: the token in the URL
        return s.client.get(f"/api/v1/sessions/{sid}/stream?token={token}", headers=UPGRADE)
    if transport == "ws_header":
        return s.client.get(f"/api/v1/sessions/{sid}/stream", headers={**UPGRADE, "Authorization": f"Bearer {token}"})
    if transport == "sse_query":  # EventSource: the token in the URL
        return s.client.get(f"/api/v1/sessions/{sid}/events?token={token}", headers={"Accept": "text/event-stream"})
    assert transport == "sse_header"
    return s.client.get(f"/api/v1/sessions/{sid}/events",
                        headers={"Accept": "text/event-stream", "Authorization": f"Bearer {token}"})


TRANSPORTS = ("rest", "rest_post", "ws_query", "ws_header", "sse_query", "sse_header")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_bad_token_is_401_with_its_reason_on_every_transport(strict, rsa_key, name, transport):
    make, code = BAD_TOKENS[name]
    resp = call(strict, transport, make(strict, rsa_key))
    assert resp.status_code == 401, (name, transport, resp.status_code, resp.get_data()[:300])
    assert resp.mimetype == "application/json" and "Upgrade" not in resp.headers
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_good_token_passes_the_same_gate(strict, transport):
    """The control for the table: the same calls with a good token get past auth (a 404 for an
    unknown session proves it on the streams without opening one)."""
    unknown = str(uuid.uuid4())
    resp = call(strict, transport, strict.good(), session_id=unknown)
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    if transport == "rest":
        assert call(strict, transport, strict.good()).status_code == 200


def test_decode_checks_nbf_iat_aud_and_iss():
    now = int(time.time())
    base = {"sub": "alice", "exp": now + 60}
    ok = {"aud": "a", "iss": "i"}
    for claims, code in (({**base, **ok, "nbf": now + 120}, "token_not_yet_valid"),
                         ({**base, **ok, "iat": now + 120}, "token_not_yet_valid"),
                         ({**base, "aud": "x", "iss": "i"}, "invalid_token"),
                         ({**base, "aud": "a", "iss": "x"}, "invalid_token"), (base, "invalid_token")):
        with pytest.raises(Unauthorized) as err:
            decode_token(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET, audience="a", issuer="i")
        assert err.value.code == code, claims
    good = jwt.encode({**base, "aud": "a", "iss": "i"}, SECRET, algorithm="HS256")
    assert decode_token(good, SECRET, audience="a", issuer="i")["sub"] == "alice"
    # Not configured: aud and iss are not checked, whatever the token says.
    unchecked = jwt.encode({**base, "aud": "x", "iss": "y"}, SECRET, algorithm="HS256")
    assert decode_token(unchecked, SECRET)["sub"] == "alice"


def test_minted_tokens_carry_a_random_jti_and_the_configured_aud_and_iss():
    from core.session_tokens import SCOPE_CLAIM, mint_session_token

    one, two = (decode_token(mint_token(SECRET, "alice", 60), SECRET) for _ in range(2))
    assert len(one["jti"]) >= 32 and one["jti"] != two["jti"] and "aud" not in one and "iss" not in one
    claims = decode_token(mint_token(SECRET, "alice", 60, audience="a", issuer="i"), SECRET, "a", "i")
    assert (claims["aud"], claims["iss"]) == ("a", "i")
    scoped = decode_token(mint_session_token(SECRET, "alice", "sid", 60, "a", "i"), SECRET, "a", "i")
    assert scoped[SCOPE_CLAIM] == "sid" and scoped["jti"] and scoped["aud"] == "a"
    with pytest.raises(Unauthorized):  # a token without the audience is refused where one is required
        decode_token(mint_session_token(SECRET, "alice", "sid", 60), SECRET, "a", "i")


def test_the_server_accepts_tokens_minted_with_its_audience_and_issuer(strict, api_settings):
    from core.session_tokens import mint_session_token

    owner_token = mint_token(api_settings.jwt_secret, "alice", 60, audience=AUDIENCE, issuer=ISSUER)
    assert call(strict, "rest", owner_token).status_code == 200
    scoped = mint_session_token(api_settings.jwt_secret, "alice", strict.sid, 60, AUDIENCE, ISSUER)
    assert call(strict, "rest", scoped).status_code == 200
    plain = mint_token(api_settings.jwt_secret, "alice", 60)  # no aud/iss: refused once they are configured
    assert call(strict, "rest", plain).get_json()["error"]["code"] == "invalid_token"


# -- revocation -------------------------------------------------------------------------------------

def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_revoking_the_presented_token_refuses_it_until_it_would_expire(client, token, api_settings):
    from core.revocations import Revocations

    doomed, sibling = token("revoker"), token("revoker")
    assert client.get("/api/v1/sessions", headers=bearer(doomed)).status_code == 200
    resp = client.post("/api/v1/tokens/revoke", headers=bearer(doomed))
    assert resp.status_code == 200, resp.get_json()
    claims = decode_token(doomed, api_settings.jwt_secret)
    assert resp.get_json() == {"jti": claims["jti"], "exp": claims["exp"], "revoked": True}
    again = client.get("/api/v1/sessions", headers=bearer(doomed))
    assert again.status_code == 401 and again.get_json()["error"]["code"] == "token_revoked"
    assert client.get("/api/v1/sessions", headers=bearer(sibling)).status_code == 200  # only that one
    # The entry lives as long as the token would have, and no longer.
    revocations = Revocations(redis.Redis.from_url(api_settings.redis_url), api_settings.key_prefix)
    ttl = revocations.redis.ttl(revocations.key("revoker", claims["jti"]))
    assert 0 < ttl <= claims["exp"] - int(time.time()) + 1


def test_revoking_another_of_ones_tokens_by_token_or_by_jti(client, token, api_settings):
    mine, by_token, by_jti = token("keeper"), token("keeper"), token("keeper")
    assert client.post("/api/v1/tokens/revoke", json={"token": by_token}, headers=bearer(mine)).status_code == 200
    claims = decode_token(by_jti, api_settings.jwt_secret)
    resp = client.post("/api/v1/tokens/revoke", json={"jti": claims["jti"], "exp": claims["exp"]},
                       headers=bearer(mine))
    assert resp.status_code == 200 and resp.get_json()["revoked"] is True
    for gone in (by_token, by_jti):
        assert client.get("/api/v1/sessions", headers=bearer(gone)).get_json()["error"]["code"] == "token_revoked"
    assert client.get("/api/v1/sessions", headers=bearer(mine)).status_code == 200


def test_nobody_revokes_another_owners_token(client, token, api_settings):
    alices, mallorys = token("alice"), token("mallory")
    resp = client.post("/api/v1/tokens/revoke", json={"token": alices}, headers=bearer(mallorys))
    assert resp.status_code == 400 and resp.get_json()["error"]["field"] == "token"
    claims = decode_token(alices, api_settings.jwt_secret)  # her jti, revoked under mallory's name: no effect
    resp = client.post("/api/v1/tokens/revoke", json={"jti": claims["jti"], "exp": claims["exp"]},
                       headers=bearer(mallorys))
    assert resp.status_code == 200
    assert client.get("/api/v1/sessions", headers=bearer(alices)).status_code == 200


@pytest.mark.parametrize("body,status,code", [
    ({"jti": "abc"}, 400, "validation_error"),                       # exp missing
    ({"jti": "abc", "exp": 10**12}, 400, "validation_error"),         # past what Redis can keep
    ({"jti": "x" * 300, "exp": NOW + 60}, 400, "validation_error"),
    ({"token": "garbage"}, 400, "validation_error"),
    ({"token": "t", "jti": "j", "exp": NOW + 60}, 400, "validation_error"),
    ({"surprise": 1}, 400, "validation_error"),
])
def test_bad_revoke_requests_are_400(client, auth, body, status, code):
    resp = client.post("/api/v1/tokens/revoke", json=body, headers=auth("revoke-bad"))
    assert resp.status_code == status and resp.get_json()["error"]["code"] == code


def test_revoke_edge_cases(client, token, api_settings):
    now = int(time.time())
    no_jti = jwt.encode({"sub": "edge", "exp": now + 60}, api_settings.jwt_secret, algorithm="HS256")
    resp = client.post("/api/v1/tokens/revoke", headers=bearer(no_jti))
    assert resp.status_code == 422 and resp.get_json()["error"]["code"] == "not_revocable"
    expired = mint_token(api_settings.jwt_secret, "edge", 1, now=now - 120)
    resp = client.post("/api/v1/tokens/revoke", json={"token": expired}, headers=bearer(token("edge")))
    assert resp.status_code == 200 and resp.get_json()["revoked"] is False
    from core.session_tokens import mint_session_token  # an agent's token may not revoke anything
    scoped = mint_session_token(api_settings.jwt_secret, "edge", str(uuid.uuid4()), 60)
    assert client.post("/api/v1/tokens/revoke", headers=bearer(scoped)).status_code in (401, 403)


@pytest.fixture(scope="module")
def served(app):
    """The app on a real HTTP server (werkzeug's, threaded) for clients that speak HTTP themselves."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_websocket_handshake_over_the_wire_is_refused_with_401(served, client, auth, token, settings):
    import websocket

    sid = client.post("/api/v1/sessions", json={}, headers=auth("wire")).get_json()["id"]
    expired = mint_token(settings.jwt_secret, "wire", 1, now=time.time() - 120)
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"ws://{served}/api/v1/sessions/{sid}/stream?token={expired}", timeout=10)
    assert err.value.status_code == 401 and b"token_expired" in err.value.resp_body
    ws = websocket.create_connection(f"ws://{served}/api/v1/sessions/{sid}/stream?token={token('wire')}", timeout=10)
    ws.close()  # the control: the same handshake with a good token upgrades


def test_ccd_token_revoke_revokes_the_token_in_use(served, token):
    from client.cli import main

    doomed = token("cli-revoker")
    assert main(["--url", f"http://{served}", "--token", doomed, "token", "revoke"]) == 0
    from client.api import Client, Unauthorized as ClientUnauthorized

    with pytest.raises(ClientUnauthorized) as err:
        Client(f"http://{served}", doomed).list_sessions()
    assert err.value.code == "token_revoked"


def test_with_redis_down_tokens_still_pass_and_revoking_is_503(api_settings, token):
    """The revocation list cannot be read without Redis: tokens pass (the API keeps taking work without
    Redis), and a revocation, which cannot be stored, is a 503 rather than a silent success."""
    from tests.stack import free_port
    from web import create_app

    down = create_app(replace(api_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    assert down.get("/api/v1/sessions", headers=bearer(token("redisless"))).status_code == 200
    resp = down.post("/api/v1/tokens/revoke", headers=bearer(token("redisless")))
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "redis_unavailable"


@pytest.fixture
def serve():
    """Serves an app on a real HTTP server for the test; its base URL."""
    from werkzeug.serving import make_server

    servers = []

    def start(app) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"
    yield start
    for server in servers:
        server.shutdown()


def test_a_far_future_revocation_cannot_write_a_key_that_outlives_the_longest_token(app, serve, token, api_settings):
    import requests

    base = serve(app)
    owner = f"immortal-{uuid.uuid4().hex[:8]}"
    resp = requests.post(f"{base}/api/v1/tokens/revoke", json={"jti": "made-up", "exp": 4_102_444_800},
                         headers=bearer(token(owner)), timeout=10)
    assert resp.status_code == 200 and resp.json()["revoked"] is True, resp.text
    ttl = redis.Redis.from_url(api_settings.redis_url).ttl(f"{api_settings.key_prefix}:revoked:{owner}:made-up")
    assert 0 < ttl <= api_settings.max_token_ttl_seconds, ttl
    # What makes the cap safe: no token that lives longer than that is accepted, so none outlives its entry.
    now = int(time.time())
    too_long = jwt.encode({"sub": owner, "iat": now, "exp": now + api_settings.max_token_ttl_seconds + 1,
                           "jti": "made-up-too"}, api_settings.jwt_secret, algorithm="HS256")
    no_iat = jwt.encode({"sub": owner, "exp": now + api_settings.max_token_ttl_seconds + 60},
                        api_settings.jwt_secret, algorithm="HS256")
    for refused in (too_long, no_iat):
        resp = requests.get(f"{base}/api/v1/sessions", headers=bearer(refused), timeout=10)
        assert resp.status_code == 401 and "CCD_MAX_TOKEN_TTL_SECONDS" in resp.json()["error"]["message"], resp.text
    longest = mint_token(api_settings.jwt_secret, owner, api_settings.max_token_ttl_seconds)
    assert requests.get(f"{base}/api/v1/sessions", headers=bearer(longest), timeout=10).status_code == 200


def test_revocation_requests_are_rate_limited_per_owner(api_settings, serve, token):
    import requests
    from web import create_app

    base = serve(create_app(replace(api_settings, owner_revocations_per_hour=3)))
    flooder, other = f"flood-{uuid.uuid4().hex[:8]}", f"calm-{uuid.uuid4().hex[:8]}"
    for n in range(3):
        resp = requests.post(f"{base}/api/v1/tokens/revoke", json={"jti": f"j{n}", "exp": int(time.time()) + 60},
                             headers=bearer(token(flooder)), timeout=10)
        assert resp.status_code == 200, resp.text
    resp = requests.post(f"{base}/api/v1/tokens/revoke", json={"jti": "j3", "exp": int(time.time()) + 60},
                         headers=bearer(token(flooder)), timeout=10)
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "revocation_limit" and error["limit"] == 3
    assert 0 < int(resp.headers["Retry-After"]) <= 3600 and error["retry_after"] == int(resp.headers["Retry-After"])
    keys = redis.Redis.from_url(api_settings.redis_url)
    assert not keys.exists(f"{api_settings.key_prefix}:revoked:{flooder}:j3")  # refused, so nothing was written
    # Another owner is not held back by the flooder.
    resp = requests.post(f"{base}/api/v1/tokens/revoke", json={"jti": "j0", "exp": int(time.time()) + 60},
                         headers=bearer(token(other)), timeout=10)
    assert resp.status_code == 200, resp.text
