"""Liveness and readiness: answer without auth; readiness checks Postgres and Redis."""
import logging

import redis
from flask import Blueprint
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from web.context import ctx
from web.errors import error_response

log = logging.getLogger(__name__)

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    """The process is up and serving requests."""
    return {"status": "ok"}


@health.get("/readyz")
def readyz():
    """Postgres and Redis answer; otherwise a 503 (database_unavailable, or redis_unavailable when only Redis
    failed) whose `failed` lists every dependency that did not answer."""
    failed = [name for name, check in (("postgres", database_answers), ("redis", redis_answers)) if not check()]
    if not failed:
        return {"status": "ready"}
    code = "database_unavailable" if "postgres" in failed else "redis_unavailable"
    return error_response(503, code, f"not answering: {', '.join(failed)}; try again shortly", failed=failed)


def database_answers() -> bool:
    try:
        with ctx().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.error("readiness: database unavailable: %s", getattr(exc, "orig", None) or exc)
        return False
    return True


def redis_answers() -> bool:
    try:
        ctx().events.redis.ping()
    except redis.RedisError as exc:
        log.error("readiness: redis unavailable: %s", exc)
        return False
    return True
