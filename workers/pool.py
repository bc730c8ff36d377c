"""The warm pool: started, hardened containers kept ready on this host, so a new session takes one instead of
waiting for a cold start. One container goes to one session (an atomic pop from this host's list), is renamed
to be that session's, and is never handed out again: it is removed with its session."""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime

import redis
from docker.errors import APIError, NotFound
from redis.exceptions import LockError

from core.settings import Settings
from workers.context import WorkerContext
from core.limits import DEFAULT_LIMITS
from workers.runtime import DockerRuntime, disk_limit_mb

log = logging.getLogger(__name__)

POOL_LABEL = "ccd.pool"  # the config key the container was made for
HOST_LABEL = "ccd.host"  # the worker host whose list holds it (hosts may share a Docker engine)
LOCK_SECONDS = 60  # how long a filler holds the lock per container it makes; a crashed filler lets go
# An unlisted pool container made or popped less than this ago may be a fill (made, not yet listed) or a take
# (popped, not yet renamed: milliseconds) in flight in another process; older, a crash left it.
ORPHAN_SECONDS = 2 * LOCK_SECONDS
FILL_ROUNDS = 3  # a filler looks again after letting go of the lock, for takes it may have missed
# Pops the first id and notes when, in one step: a clean-up then knows a popped container is being taken.
POP = """
local id = redis.call('LPOP', KEYS[1])
if id then redis.call('HSET', KEYS[2], id, ARGV[1]) end
return id
"""


def uses_pool(config: dict, settings: Settings) -> bool:
    """Whether a session with this config may take a warm container: pool containers have the default limits
    (and the default disk limit, which sizes their volumes where the volume driver can)."""
    limits = config.get("limits") or {}
    return (all(limits.get(name, value) == value for name, value in DEFAULT_LIMITS.items())
            and disk_limit_mb(config, settings) == settings.disk_mb_default)


class WarmPool:
    """This host's warm containers: the ids of started ones in a Redis list, topped up to CCD_WARM_POOL_SIZE."""

    def __init__(self, settings: Settings, runtime: DockerRuntime, client: redis.Redis) -> None:
        self.settings, self.runtime, self.redis = settings, runtime, client
        self.size = settings.warm_pool_size
        self.key = f"{settings.key_prefix}:pool:{settings.host_name}"
        self.taking = f"{self.key}:taking"  # id -> when it was popped, until it is renamed (or dropped)
        self.name_prefix = f"{settings.key_prefix}-pool-"
        self.orphan_seconds: float = ORPHAN_SECONDS

    @classmethod
    def of(cls, ctx: WorkerContext) -> "WarmPool":
        """The pool of the host this worker process runs on."""
        return cls(ctx.settings, ctx.runtime, ctx.events.redis)

    def config_key(self) -> str:
        """What makes two pool containers interchangeable: the image (by id, so a rebuilt image retires the old
        ones), the network, the /tmp size, the limits and the open-files limit."""
        image = self.runtime.api.inspect_image(self.settings.image)["Id"]
        spec = [image, self.settings.session_network, self.settings.tmp_mb, DEFAULT_LIMITS, self.settings.nofile]
        if self.runtime.sizes_volumes():  # a new default disk size retires containers whose volumes have the old
            spec.append(self.settings.disk_mb_default)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def ready(self) -> int:
        """How many started containers the pool holds now."""
        return self.redis.llen(self.key)

    def take(self, session_id: str) -> str | None:
        """A started pool container, renamed to be the session's; None when there is none (start cold then)."""
        if self.size == 0 or not self.ready():
            return None
        try:
            key = self.config_key()
        except NotFound:
            return None  # no image: the cold start says so plainly
        pop = self.redis.register_script(POP)
        while (container_id := pop(keys=[self.key, self.taking], args=[time.time()])) is not None:
            # Popped: no other process or host can have it; whatever happens next, it is never listed again.
            try:
                if self._give(container_id, key, session_id):
                    return container_id
            except APIError:
                return None  # logged; the caller starts (or finds) the session's container the cold way
            finally:
                self.redis.hdel(self.taking, container_id)
        return None

    def _give(self, container_id: str, key: str, session_id: str) -> bool:
        """Renames a popped container to be the session's; False (and it is removed) when it cannot serve."""
        container = self._usable(container_id, key)
        if container is None:
            return False
        try:
            container.rename(self.runtime.container_name(session_id))
        except NotFound:
            return False  # removed meanwhile (this host's worker started again and cleared the pool)
        except APIError as exc:
            # 409: the session got its container meanwhile (a start received twice); else Docker trouble.
            log.warning("warm pool: could not give container %s to session %s: %s", container.short_id,
                        session_id, exc)
            self.runtime.remove_container(container)
            raise
        log.debug("warm pool: session %s took container %s", session_id, container.short_id)
        return True

    def _usable(self, container_id: str, key: str):
        """The popped container when it is a running pool container of this config; else it is removed."""
        try:
            container = self.runtime.client.containers.get(container_id)
        except NotFound:
            return None
        if container.status == "running" and self._mine(container) and container.labels.get(POOL_LABEL) == key:
            return container
        log.info("warm pool: dropping container %s (%s, made for %s)", container.short_id, container.status,
                 "this config" if container.labels.get(POOL_LABEL) == key else "another config")
        if self._mine(container):  # never a session's container, whatever the list said
            self.runtime.remove_container(container)
        return None

    def _mine(self, container) -> bool:
        """Whether a container is an untaken pool container of this host."""
        return (container.name.startswith(self.name_prefix) and container.labels.get(HOST_LABEL) ==
                self.settings.host_name and container.labels.get("ccd.prefix") == self.settings.key_prefix)

    def fill(self, startup: bool = False) -> int:
        """Tops the pool up to its size, after clearing out what is dead or stale; returns how many are ready.

        One filler per host at a time: one that finds the lock taken leaves the work to its holder, which looks
        again after letting go; at `startup` it waits instead (the holder may be this host's previous worker,
        killed mid-fill, whose lock runs out), and it runs even with the pool off, to clear what was left.
        """
        if self.size == 0 and not startup:
            return 0
        made = 0
        for _ in range(FILL_ROUNDS):
            lock = self.redis.lock(f"{self.key}:filling", timeout=LOCK_SECONDS)
            if not lock.acquire(blocking=startup, blocking_timeout=LOCK_SECONDS + 5):
                return self.ready()
            try:
                self.prune()
                made += self._top_up(lock)
            finally:
                try:
                    lock.release()
                except LockError:  # it ran out while a slow engine made a container
                    pass
            startup = False
            if self.ready() >= self.size:
                break
        ready = self.ready()
        if made:
            log.info("warm pool: %d ready (%d made)", ready, made)
        return ready

    def _top_up(self, lock) -> int:
        """Makes and starts containers until the list holds the pool's size; returns how many it made."""
        key, made = self.config_key(), 0
        while self.ready() < self.size:
            self.redis.rpush(self.key, self._make(key))
            made += 1
            lock.reacquire()  # another LOCK_SECONDS for the next one
        return made

    def _make(self, key: str) -> str:
        """One pool container, made exactly like a session's cold one and started; returns its id."""
        self.runtime.require_firewall()
        name = f"{self.name_prefix}{uuid.uuid4().hex[:12]}"
        labels = {"ccd.prefix": self.settings.key_prefix, POOL_LABEL: key, HOST_LABEL: self.settings.host_name}
        container = self.runtime.create_container(name, labels, {"workspace": f"{name}-workspace",
                                                                 "home": f"{name}-home"},
                                                 {**DEFAULT_LIMITS, "disk_mb": self.settings.disk_mb_default})
        try:
            container.start()
        except Exception:
            self.runtime.remove_container(container)
            raise
        return container.id

    def prune(self) -> int:
        """Removes listed containers that are gone, stopped (an engine restart) or made for another config, those
        past the pool's size, and pool containers a crash left out of the list; returns how many."""
        key = self.config_key()
        # In this order: a container popped after `listed` was read shows in `taking`, and one renamed after
        # `taking` was read shows in `found` with its session's name, which is not ours to remove.
        listed, taking = self.redis.lrange(self.key, 0, -1), self.redis.hgetall(self.taking)
        found = {c.id: c for c in self.runtime.client.containers.list(all=True, filters={"label": [
            f"ccd.prefix={self.settings.key_prefix}", f"{HOST_LABEL}={self.settings.host_name}", POOL_LABEL]},
            ignore_removed=True)}  # a taken one whose session is being deleted may go between the list and its inspect
        stale = [cid for cid in listed if cid not in found or found[cid].status != "running"
                 or found[cid].labels.get(POOL_LABEL) != key or not self._mine(found[cid])]
        keep = [cid for cid in listed if cid not in stale]
        stale += keep[self.size:]
        removed = 0
        for cid in stale:
            if self.redis.lrem(self.key, 0, cid) and cid in found and self._mine(found[cid]):
                self.runtime.remove_container(found[cid])
                removed += 1
        now = time.time()
        for cid, container in found.items():
            since = now - max(created_at(container), float(taking.get(cid, 0)))
            if cid not in listed and self._mine(container) and since >= self.orphan_seconds:
                self.runtime.remove_container(container)
                removed += 1
        if old := [cid for cid, when in taking.items() if now - float(when) >= self.orphan_seconds]:
            self.redis.hdel(self.taking, *old)  # takes cut short by a crash: their containers went above
        self._remove_unmounted_volumes()
        if removed:
            log.info("warm pool: removed %d stale containers", removed)
        return removed

    def _remove_unmounted_volumes(self) -> None:
        """Removes this host's pool volumes no container mounts: a removal cut short between a container and its
        volumes leaves them (Docker makes a pool container's volumes with it, so none is ever unmounted in
        between)."""
        labels = [f"ccd.prefix={self.settings.key_prefix}", f"{HOST_LABEL}={self.settings.host_name}", POOL_LABEL]
        volumes = self.runtime.client.volumes.list(filters={"dangling": True, "label": labels})
        self.runtime.remove_volumes(v.name for v in volumes)


def created_at(container) -> float:
    """When Docker made the container, as a Unix time."""
    stamp = container.attrs["Created"]  # RFC 3339 with nanoseconds: cut to what fromisoformat reads
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{frac[:6] or '0'}+00:00").timestamp()
