"""Webhooks: which URLs may receive them, and the HMAC-SHA256 signature their receiver checks.

Header `CCD-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed with
CCD_WEBHOOK_SECRET. A receiver recomputes it and rejects old timestamps (replays).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from core.errors import ValidationFailed

SIGNATURE_HEADER = "CCD-Signature"


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not ip.is_global or ip.is_multicast


def check_enabled(enabled: bool, field: str = "webhook") -> None:
    """Refuses a webhook when the operator turned them off (CCD_WEBHOOKS_ENABLED=false): it could not be signed."""
    if not enabled:
        raise ValidationFailed("webhooks are off on this server (CCD_WEBHOOKS_ENABLED=false)", field=field,
                               code="webhooks_disabled")


def check_url(url: str, allow_private: bool, field: str = "webhook") -> str:
    """The URL when it may receive webhooks; never loopback, link-local or private unless allowed.

    Checked on submission and again before each delivery (the name may resolve elsewhere later).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(f"{field} must be an http(s) URL with a host", field=field,
                               code="invalid_webhook")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValidationFailed(f"{field} host {parts.hostname!r} does not resolve ({exc})", field=field,
                               code="invalid_webhook") from None
    if not allow_private and any(_private(info[4][0]) for info in infos):
        raise ValidationFailed(f"{field} host {parts.hostname!r} is a loopback, link-local or private "
                               "address; webhooks go to public addresses unless the operator sets "
                               "CCD_WEBHOOK_ALLOW_PRIVATE=true", field=field, code="webhook_not_allowed")
    return url


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for `body`."""
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_seconds: int = 300) -> bool:
    """True when `header` signs `body` with `secret` and is recent."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        ts = int(fields.get("t", ""))
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, ts), f"t={ts},v1={fields.get('v1', '')}")
