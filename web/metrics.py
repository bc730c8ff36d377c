"""The web tier's metrics: HTTP requests by route and status, stream lag, and GET /metrics.

With PROMETHEUS_MULTIPROC_DIR set (several gunicorn processes), every process writes its figures there and
a scrape of any one of them adds them all up; see README "Metrics".
"""
from __future__ import annotations

import time
from datetime import datetime

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import Counter, Histogram

from core.envelope import Event
from core.metrics import exposition, scrape_allowed
from web.context import ctx
from web.errors import error_response
from web.state_metrics import StateCollector

HTTP_REQUESTS = Counter("ccd_http_requests_total", "HTTP requests answered, by method, route (the URL rule) "
                        "and status", ["method", "route", "status"])
HTTP_DURATION = Histogram("ccd_http_request_duration_seconds", "Seconds to answer an HTTP request (a streamed "
                          "body: to its headers; a WebSocket: its whole life), by method and route",
                          ["method", "route"])
STREAM_LAG = Histogram("ccd_stream_lag_seconds", "Seconds from an event's ts to its delivery to a client that "
                       "was following live (WebSocket, SSE or NDJSON), by transport", ["transport"],
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STREAM_DROPPED = Counter("ccd_stream_dropped_total", "Live followers dropped for falling more than "
                         "CCD_STREAM_BUFFER_EVENTS behind (they resume with since=), by transport", ["transport"])
UNMATCHED = "unmatched"  # no URL rule matched (404, 405): one label value, whatever the path

metrics = Blueprint("metrics", __name__)


@metrics.get("/metrics")
def scrape():
    """Prometheus text format; with CCD_METRICS_TOKEN set, only for `Authorization: Bearer <it>`."""
    if not scrape_allowed(request.headers.get("Authorization"), ctx().settings.metrics_token):
        return error_response(401, "unauthorized", "send Authorization: Bearer <CCD_METRICS_TOKEN>")
    body, content_type = exposition(StateCollector(ctx().engine, ctx().events.redis, ctx().settings))
    return Response(body, content_type=content_type)


def instrument(app: Flask) -> None:
    """Counts and times every request the app answers, labelled by its URL rule."""

    @app.before_request
    def _start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response):
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            HTTP_DURATION.labels(request.method, route).observe(time.perf_counter() - started)
        return response


class LagMeter:
    """Observes stream lag for one follower: only events published after it connected, so a replay of
    old events is not counted as lag."""

    def __init__(self, transport: str) -> None:
        self.connected = time.time()
        self.histogram = STREAM_LAG.labels(transport)

    def delivered(self, event: Event) -> None:
        published = event.__dict__.get("_published")  # parsed once per event, however many followers
        if published is None:
            try:
                published = event.__dict__["_published"] = datetime.fromisoformat(event.ts).timestamp()
            except (TypeError, ValueError):
                return
        if published >= self.connected:
            self.histogram.observe(max(0.0, time.time() - published))
