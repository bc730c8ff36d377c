"""Liveness and readiness: answer without auth; readiness checks Postgres and Redis."""
from flask import Blueprint
from sqlalchemy import text

from web.context import ctx

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    """The process is up and serving requests."""
    return {"status": "ok"}


@health.get("/readyz")
def readyz():
    """Postgres and Redis answer; otherwise the usual 503 (database_unavailable or redis_unavailable)."""
    with ctx().engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    ctx().events.redis.ping()
    return {"status": "ready"}
