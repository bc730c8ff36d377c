"""Liveness: answers without auth and without touching dependencies."""
from flask import Blueprint

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    """The process is up and serving requests."""
    return {"status": "ok"}
