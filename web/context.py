"""The web process's shared resources, and the per-request database session."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from flask import current_app
from sqlalchemy.orm import Session as DbSession

from core import batches
from core.cancels import CancelSignals
from core.db import make_engine, make_session_factory, transaction
from core.events import EventLog
from core.queues import TaskSender
from core.settings import Settings
from core.storage import storage_from_settings


class WebContext:
    """One engine, one Redis pool, one task sender per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self.db = make_session_factory(self.engine)
        self.events = EventLog.from_settings(settings)
        self.sender = TaskSender(settings)
        self.cancels = CancelSignals(self.events.redis, settings.key_prefix)
        self.storage = storage_from_settings(settings)

    def advance_batches(self, batch_ids: list) -> None:
        """Moves batches on after some of their turns ended here (the worker does it for the rest)."""
        batches.advance(self.db, self.events, self.sender, self.cancels, self.settings, batch_ids)


def ctx() -> WebContext:
    return current_app.extensions["ccd"]


@contextmanager
def unit_of_work() -> Iterator[DbSession]:
    """A transaction for one request step; committed when the block ends without error."""
    with transaction(ctx().db) as db:
        yield db
