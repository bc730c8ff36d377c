"""Per-process resources of a worker: settings, database, event log, Docker runtime, storage, task sender; and the
Docker-free part of them that the webhook consumer has (ServiceContext)."""
from __future__ import annotations

import os
from functools import cached_property

from core.cancels import CancelSignals
from core.db import make_engine, make_session_factory
from core.events import EventLog
from core.queues import TaskSender
from core.settings import Settings


class ServiceContext:
    """Settings, the database and the task sender, built lazily, so each forked process opens its own connections.
    No Docker client: the webhook consumer runs on this alone."""

    RESOURCES: tuple[str, ...] = ("engine", "db", "sender")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def engine(self):
        return make_engine(self.settings)

    @cached_property
    def db(self):
        return make_session_factory(self.engine)

    @cached_property
    def sender(self) -> TaskSender:
        return TaskSender(self.settings)

    def reset_after_fork(self) -> None:
        """Drops connections inherited from the parent; a child must never share a socket."""
        for name in self.RESOURCES:
            value = self.__dict__.pop(name, None)
            if name == "engine" and value is not None:
                value.dispose(close=False)


class WorkerContext(ServiceContext):
    """A worker's: the event log, cancel signals, the Docker runtime and storage too."""

    RESOURCES = ServiceContext.RESOURCES + ("events", "cancels", "hot", "runtime", "storage")

    @cached_property
    def events(self) -> EventLog:
        return EventLog.from_settings(self.settings)

    @cached_property
    def cancels(self) -> CancelSignals:
        return CancelSignals(self.events.redis, self.settings.key_prefix)

    @cached_property
    def hot(self):
        from workers.hot import HotSessions

        return HotSessions(self.events.redis, self.settings)

    @cached_property
    def runtime(self):
        from workers.runtime import DockerRuntime

        return DockerRuntime(self.settings)

    @cached_property
    def storage(self):
        from core.storage import storage_from_settings

        return storage_from_settings(self.settings)

    @property
    def holder(self) -> str:
        """Who holds a lease: this host and process."""
        return f"{self.settings.host_name}:{os.getpid()}"
