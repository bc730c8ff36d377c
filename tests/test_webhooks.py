"""Webhook signatures and the address check, without a network."""
import time

import pytest

from core.errors import ValidationFailed
from core.webhooks import check_url, sign, verify


SECRET = "webhook-secret-of-32-bytes-or-so!"  # as long as the server accepts (core/settings.py)


def test_a_signature_verifies_only_with_its_secret_body_and_time():
    body = b'{"id": "t1", "status": "succeeded"}'
    header = sign(SECRET, body)
    assert header.startswith("t=") and ",v1=" in header
    assert verify(SECRET, header, body)
    assert not verify("another-webhook-secret-of-32-bytes", header, body)
    assert not verify(SECRET, header, body + b" ")
    old = sign(SECRET, body, int(time.time()) - 3600)
    assert not verify(SECRET, old, body), "an old signature is a replay"
    assert not verify(SECRET, "garbage", body)


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:8080/x", "http://[::1]/x",
                                 "http://192.168.1.5/x", "http://169.254.169.254/x", "http://0.0.0.0/x"])
def test_local_and_private_addresses_need_the_operators_consent(url):
    with pytest.raises(ValidationFailed) as err:
        check_url(url, allow_private=False)
    assert err.value.code == "webhook_not_allowed"
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http:///nohost", "not a url", "http://no-such-host.invalid/"])
def test_malformed_or_unresolvable_urls_are_refused(url):
    with pytest.raises(ValidationFailed) as err:
        check_url(url, allow_private=True)
    assert err.value.code == "invalid_webhook" and err.value.field == "webhook"


def test_a_public_address_is_allowed():
    assert check_url("https://93.184.215.14/hook", allow_private=False)
