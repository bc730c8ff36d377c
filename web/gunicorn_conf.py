"""gunicorn's settings for the web tier, one file for compose, `make run` and the tests: `-c python:web.gunicorn_conf`.

A WebSocket or SSE follower holds its connection for as long as the client watches, so the worker class
must hold many at once: gevent (one greenlet each) by default; `gthread` is the fallback without gevent.
"""
import os

worker_class = os.environ.get("WEB_WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_WORKERS", "2"))
# gevent: open connections per process; gthread: threads per process (a WebSocket takes two).
worker_connections = int(os.environ.get("WEB_CONNECTIONS", "2000"))
threads = int(os.environ.get("WEB_THREADS", "64"))
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_SECONDS", "5"))
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
