"""The Celery app for monitors, built from the environment: `celery -A workers.monitor flower`.

Our broker keys and event channels carry the key prefix, so Flower (or `celery events`) must use this app's
broker settings rather than a bare `--broker` URL, or it sees no workers.
"""
from core.queues import make_celery
from core.settings import Settings

app = make_celery(Settings.from_env(), main="ccd-monitor")
