"""Domain errors: each carries the stable code and HTTP status the API reports for it."""
from __future__ import annotations


class DomainError(Exception):
    """A failure the caller can act on; web/errors.py turns it into a JSON error body."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code:
            self.code = code


class ConfigError(DomainError):
    code = "config_error"


class ValidationFailed(DomainError):
    status = 400
    code = "validation_error"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class WrongState(DomainError):
    status = 409
    code = "wrong_state"


class TooLarge(DomainError):
    status = 413
    code = "too_large"


class Unavailable(DomainError):
    status = 503
    code = "unavailable"
