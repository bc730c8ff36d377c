"""Error mapping: every failure becomes {"error": {"code", "message"}} with the right status."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify, request
from pydantic import ValidationError
from kombu.exceptions import OperationalError as BrokerDown
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import WebsocketMismatch

from core.admission import OverLimit
from core.errors import DomainError

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              406: "not_acceptable", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
              422: "unprocessable", 429: "over_limit"}


def error_response(status: int, code: str, message: str, **extra):
    body = {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    return jsonify({"error": body}), status


def validation_response(exc: ValidationError, prefix: str = ""):
    """A 400 naming the first bad field, with every problem listed."""
    details = [{"field": prefix + ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
               for err in exc.errors()]
    first = details[0]
    message = f"{first['field'] or 'body'}: {first['message']}"
    return error_response(400, "validation_error", message, field=first["field"], details=details)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain(exc: DomainError):
        if isinstance(exc, OverLimit):
            body, status = error_response(429, exc.code, exc.message, limit=exc.limit, retry_after=exc.retry_after)
            return body, status, {"Retry-After": str(exc.retry_after)}
        # `limit`: what the request may have at most, for errors that carry one (LimitExceeded).
        return error_response(exc.status, exc.code, exc.message, field=exc.field, limit=getattr(exc, "limit", None))

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError):
        return validation_response(exc)

    @app.errorhandler(WebsocketMismatch)
    def _not_a_websocket(exc: WebsocketMismatch):
        return error_response(400, "websocket_required",
                              "this endpoint is a WebSocket: connect with ws:// (or wss://) and an Upgrade")

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        # Raised by Content-Length, or while reading a chunked body past the limit of this endpoint.
        limit = request.max_content_length
        return error_response(413, "too_large", f"the request body is larger than this endpoint's limit "
                              f"({limit} bytes: CCD_MAX_BODY_BYTES, or CCD_MAX_BATCH_BYTES for batches)", limit=limit)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        status = exc.code or 500
        return error_response(status, HTTP_CODES.get(status, "http_error"), exc.description or exc.name)

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database_down(exc: Exception):
        log.error("database unavailable: %s", getattr(exc, "orig", exc))
        return error_response(503, "database_unavailable", "the database is not answering; try again shortly")

    # A Redis that restarts refuses connections, then answers LOADING (a ConnectionError) while it reads its AOF.
    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    @app.errorhandler(BrokerDown)
    def _redis_down(exc: Exception):
        log.error("redis unavailable: %s", exc)
        return error_response(503, "redis_unavailable", "the event store / queue is not answering; try again shortly")

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError):
        if exc.connection_invalidated:  # the server went away mid-request: an outage, not a bug
            return _database_down(exc)
        log.exception("database error")
        return error_response(500, "internal_error", "a database error occurred; it was logged")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred; it was logged")
