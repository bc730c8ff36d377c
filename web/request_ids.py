"""Request ids: a well-formed incoming X-Request-Id or a new one, in the log context for the request (and
the tasks it sends), echoed on every response; one log line per request."""
from __future__ import annotations

import logging
import time
import uuid

from celery.signals import before_task_publish
from flask import Flask, Response, g, request

from core.logs import (TASK_HEADER, current_log_ids, end_log_context, iterate_in_context, start_log_context,
                       well_formed_id)

HEADER = "X-Request-Id"
# Probes and scrapes would drown the lines that matter; they log at DEBUG.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")

log = logging.getLogger(__name__)


def request_id() -> str:
    """This request's id: the client's when well formed (at most 128 of A-Z a-z 0-9 . _ : -), else a new one."""
    if "request_id" not in g:
        g.request_id = well_formed_id(request.headers.get(HEADER)) or uuid.uuid4().hex
    return g.request_id


def init_app(app: Flask) -> None:
    """Registers the hooks; call before any other before_request hook, so that theirs log with the id."""
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_end)
    # Tasks sent while serving a request carry its id to the worker (workers read it in workers/tasks.py).
    before_task_publish.connect(stamp_task_headers, weak=False, dispatch_uid="ccd-request-id")


def stamp_task_headers(headers: dict | None = None, **_) -> None:
    """Adds the current request's id to an outgoing task's headers."""
    rid = current_log_ids().get("request_id")
    if rid and headers is not None:
        headers.setdefault(TASK_HEADER, rid)


def _begin() -> None:
    view_args = request.view_args or {}
    g.request_started = time.monotonic()
    g.log_token = start_log_context(request_id=request_id(), session_id=view_args.get("session_id"),
                                    turn_id=view_args.get("turn_id"))


def _finish(response: Response) -> Response:
    response.headers[HEADER] = request_id()
    if response.is_streamed and not response.direct_passthrough:
        # A streamed body runs after the request has ended: keep its lines (and errors) under the request's ids.
        response.response = iterate_in_context(response.response)
    started = g.get("request_started")
    took = f" {(time.monotonic() - started) * 1000:.0f}ms" if started is not None else ""
    # The path only: a query string may hold a token (?token= on the WebSocket and SSE).
    log.log(logging.DEBUG if request.path in QUIET_PATHS else logging.INFO, "%s %s %s%s",
            request.method, request.path, response.status_code, took)
    return response


def _end(_exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        try:
            end_log_context(token)
        except ValueError:  # ended in another context than it began in: nothing of ours to undo there
            pass
