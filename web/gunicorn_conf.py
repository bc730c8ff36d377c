"""gunicorn's settings for the web tier, one file for compose, `make run` and the tests: `-c python:web.gunicorn_conf`.

A WebSocket or SSE follower holds its connection for as long as the client watches, so the worker class
must hold many at once: gevent (one greenlet each) by default; `gthread` is the fallback without gevent.
"""
import os

from core.logs import gunicorn_log_config

worker_class = os.environ.get("WEB_WORKER_CLASS", "gevent")
if worker_class == "gthread":  # gunicorn's own gives a silent new connection no time limit: web/gthread_worker.py
    worker_class = "web.gthread_worker.ThreadWorker"
workers = int(os.environ.get("WEB_WORKERS", "2"))
# gevent: open connections per process; gthread: threads per process (a WebSocket takes two).
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "2000"))
threads = int(os.environ.get("WEB_THREADS", "64"))
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_SECONDS", "5"))
# A connection is closed when it has not sent a whole request's headers this long after it opened or after its last
# answer, so idle sockets (thousands of them, from one container) cannot take the connections others need.
keepalive = int(os.environ.get("WEB_KEEPALIVE_SECONDS", "5"))
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn's own lines (start-up, worker boots and exits, errors) in the app's format: LOG_FORMAT, LOG_LEVEL.
logconfig_dict = gunicorn_log_config(os.environ)


def on_starting(server) -> None:
    """Empties PROMETHEUS_MULTIPROC_DIR (when set) before the processes start: its files are the last run's counts."""
    from core.metrics import MULTIPROC_ENV, empty_directory

    if os.environ.get(MULTIPROC_ENV):
        empty_directory(os.environ[MULTIPROC_ENV])
