"""Token checks: HS256 only, `sub` and `exp` required, expired and unsigned tokens refused."""
import time

import jwt
import pytest

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
