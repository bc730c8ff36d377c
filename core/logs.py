"""Logging set-up shared by every process: one line per record, level from LOG_LEVEL."""
from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Celery logs every task received and finished; our own modules log what matters.
    for noisy in ("urllib3", "docker", "kombu", "amqp", "werkzeug", "celery.worker.strategy",
                  "celery.app.trace", "celery.beat"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
