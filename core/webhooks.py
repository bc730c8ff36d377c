"""Webhooks: which URLs may receive them, and the HMAC-SHA256 signature their receiver checks.

Header `CCD-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed with
CCD_WEBHOOK_SECRET. A receiver recomputes it and rejects old timestamps (replays).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import SplitResult, urlsplit

from core.errors import ValidationFailed
from core.netguard import AddressRefused, ResolveFailed, Vetted, vet

SIGNATURE_HEADER = "CCD-Signature"


def check_enabled(enabled: bool, field: str = "webhook") -> None:
    """Refuses a webhook when the operator turned them off (CCD_WEBHOOKS_ENABLED=false): it could not be signed."""
    if not enabled:
        raise ValidationFailed("webhooks are off on this server (CCD_WEBHOOKS_ENABLED=false)", field=field,
                               code="webhooks_disabled")


def target(url: str, allow_private: bool, field: str = "webhook") -> tuple[SplitResult, Vetted]:
    """The URL's parts and its host's vetted addresses; never loopback, link-local, private or metadata unless
    allowed. Delivery connects to exactly these addresses (core/netguard.py), so the name is looked up once."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ValidationFailed(f"{field} must be an http(s) URL with a host", field=field,
                               code="invalid_webhook")
    try:
        return parts, vet(parts.hostname, port or (443 if parts.scheme == "https" else 80), allow_private)
    except AddressRefused as exc:
        raise ValidationFailed(f"{field} host {parts.hostname!r} resolves to {exc.address}, a loopback, link-local, "
                               "private, metadata or reserved address; webhooks go to public addresses unless the "
                               "operator sets CCD_WEBHOOK_ALLOW_PRIVATE=true", field=field,
                               code="webhook_not_allowed") from None
    except ResolveFailed as exc:
        raise ValidationFailed(f"{field} host {exc}", field=field, code="invalid_webhook") from None


def check_url(url: str, allow_private: bool, field: str = "webhook") -> str:
    """The URL when it may receive webhooks (see `target`); checked on submission and again at each delivery."""
    target(url, allow_private, field)
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
