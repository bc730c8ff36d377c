"""The worker's own HTTP port (CCD_WORKER_METRICS_PORT): /metrics, /healthz, and /readyz, which checks Postgres,
Redis and Docker and answers 503 naming what does not answer.

It runs as a thread of the worker's main process. Its connections are its own and short-lived (no pooled
Postgres connection lingers), so the prefork children forked beside it inherit nothing they could break.
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from core.metrics import exposition, scrape_allowed
from core.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5


class Readiness:
    """Checks that this worker's dependencies answer: Postgres, Redis and the Docker engine."""

    def __init__(self, settings: Settings, docker_environ: Mapping[str, str] | None = None) -> None:
        self.engine = create_engine(settings.database_url, poolclass=NullPool,
                                    connect_args={"connect_timeout": CHECK_TIMEOUT_SECONDS})
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
                                          socket_timeout=CHECK_TIMEOUT_SECONDS)
        # The Docker client's environment (DOCKER_HOST, DOCKER_TLS_VERIFY, ...): the process's by default.
        self.docker_environ = docker_environ

    def check(self, docker: bool = True) -> dict[str, str | None]:
        """Each dependency's problem, or None where it answers; Docker only when asked (the webhook consumer and
        beat have no Docker socket, and their healthcheck makes no Docker client)."""
        checks = {"postgres": failure(self._postgres), "redis": failure(self.redis.ping)}
        return {**checks, "docker": failure(self._docker)} if docker else checks

    def _postgres(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def _docker(self) -> None:
        import docker  # here: processes that check no Docker engine do not load its client

        client = docker.from_env(environment=self.docker_environ, timeout=CHECK_TIMEOUT_SECONDS)
        try:
            client.ping()
        finally:
            client.close()


def failure(check: Callable[[], object]) -> str | None:
    """What went wrong running `check`, in one line; None when it ran."""
    try:
        check()
    except Exception as exc:
        cause = getattr(exc, "orig", None) or exc
        return (" ".join(str(cause).split()) or type(cause).__name__)[:300]
    return None


def readiness_body(checks: dict[str, str | None]) -> tuple[int, dict]:
    """200 when every dependency answers, else 503; the body names the failed ones."""
    failed = [name for name, problem in checks.items() if problem]
    body = {"status": "unready" if failed else "ready", "failed": failed,
            "checks": {name: problem or "ok" for name, problem in checks.items()}}
    return (503 if failed else 200), body


class Handler(BaseHTTPRequestHandler):
    server: "HealthServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.partition("?")[0]
        if path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            self._json(*readiness_body(self.server.readiness.check()))
        elif path == "/metrics":
            if not scrape_allowed(self.headers.get("Authorization"), self.server.token):
                self._json(401, {"error": {"code": "unauthorized", "message": "send Authorization: Bearer "
                                                                              "<CCD_METRICS_TOKEN>"}})
                return
            body, content_type = exposition()
            self._send(200, body, content_type)
        else:
            self._json(404, {"error": {"code": "not_found", "message": "try /metrics, /healthz or /readyz"}})

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("metrics port: " + format, *args)


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], readiness: Readiness, token: str) -> None:
        super().__init__(address, Handler)
        self.readiness, self.token = readiness, token


def start(settings: Settings, host: str = "0.0.0.0", readiness: Readiness | None = None) -> HealthServer | None:
    """Serves the port in a daemon thread; None when it is off (port 0) or taken (the worker runs on without it)."""
    if not settings.worker_metrics_port:
        return None
    try:
        server = HealthServer((host, settings.worker_metrics_port), readiness or Readiness(settings),
                              settings.metrics_token)
    except OSError as exc:
        log.warning("worker metrics port %s: %s; running without /metrics and /readyz",
                    settings.worker_metrics_port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True).start()
    log.info("worker metrics on port %s (/metrics, /healthz, /readyz)", server.server_address[1])
    return server
