"""Typed errors of the cc-docker client, built from the API's JSON error body."""
from __future__ import annotations

import requests


class ApiError(Exception):
    """An error answer of the API, or a failure to reach it, with the parsed error body."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})" if status else f"{message} ({code})")
        self.status, self.code, self.message, self.body = status, code, message, body or {}

    @property
    def field(self) -> str | None:
        """The request field the error names, when it names one."""
        return self.body.get("error", {}).get("field")


class ValidationError(ApiError):
    """The request was malformed or refused (400, 413, 415, 422)."""


class Unauthorized(ApiError):
    """The token is missing, invalid or expired (401, 403)."""


class NotFound(ApiError):
    """No such resource for this token's owner (404)."""


class Conflict(ApiError):
    """The resource is in the wrong state, e.g. the turn already ended (409)."""


class OverLimit(ApiError):
    """The owner is at a limit; retry after `retry_after` seconds (429)."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, body)
        self.retry_after = retry_after


class Unavailable(ApiError):
    """The server failed or one of its dependencies is down (5xx)."""


class ConnectionFailed(ApiError):
    """The server could not be reached, or the connection broke."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "connection_failed", message)


def error_class(status: int) -> type[ApiError]:
    """The exception class for an HTTP error status."""
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status >= 500:
        return Unavailable
    if status >= 400:
        return ValidationError
    return ApiError


def raise_for(resp: requests.Response) -> None:
    """Raises the typed error an error response describes; does nothing for a success."""
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or f"http_{resp.status_code}"
    message = error.get("message") or (resp.text[:200].strip() or resp.reason or "request failed")
    if resp.status_code == 429:
        raise OverLimit(resp.status_code, code, message, body, retry_after_of(resp, error))
    raise error_class(resp.status_code)(resp.status_code, code, message, body)


def retry_after_of(resp: requests.Response, error: dict) -> float | None:
    """Seconds to wait before retrying, from the Retry-After header or the body."""
    value = resp.headers.get("Retry-After", error.get("retry_after"))
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
