"""One Redis reader per web process, fanning every followed session's new events out to its local followers.

The hub's connection runs one XREAD BLOCK over every stream that has a live follower, at the hub's own
cursor per stream, and hands each batch it reads, decoded once, to every follower of that stream through
a bounded buffer. A follower first replays from its own cursor with XRANGE (a pooled connection), then
subscribes; a batch that starts past its cursor makes it fill the hole with XRANGE, and events at or
before its cursor are skipped: exactly once, in order, and no lock is ever held over I/O. A follower whose
buffer overflows is dropped (SlowClient), so a slow client never holds up the hub or the others.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
import redis

from core.envelope import Event
from core.events import EventLog, parse_stream_id

log = logging.getLogger(__name__)

BLOCK_MS = 5000  # a new stream wakes the hub at once, so this only bounds an idle round trip
READ_COUNT = 500  # entries per stream per read
# Followers' own reads (replay, holes, gap checks) at once per process: a thousand clients reconnecting
# together queue for these instead of opening a thousand pooled connections.
READ_SLOTS = 8
RETRY_PAUSE_SECONDS = 0.5
WAKE_TTL_SECONDS = 3600
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)

StreamId = tuple[int, int]
Item = tuple[StreamId, str, StreamId, list[Event]]  # (cursor before, cursor after, as a pair, the events)


class SlowClient(Exception):
    """The follower fell more than `limit` events behind and was dropped; resume after `last_id`."""

    def __init__(self, last_id: str, limit: int) -> None:
        super().__init__(f"slow client: more than {limit} events behind; resume with since={last_id}")
        self.last_id, self.limit = last_id, limit


def frame_json(event: Event) -> str:
    """The event's frame as JSON text, built once per event however many followers send it."""
    text = event.__dict__.get("_json")
    if text is None:
        text = event.__dict__["_json"] = event.to_json()  # the dataclass is frozen; its __dict__ is not
    return text


class Subscription:
    """One follower's bounded buffer of the hub's batches; the hub offers, the follower takes.

    Lock-free: each counter has one writer (the hub `added`, the follower `taken`), and deque appends
    and pops are atomic, under gevent and real threads alike.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.added, self.taken, self.dropped = limit, 0, 0, False
        self.items: deque[Item] = deque()
        self.ready = threading.Event()

    def offer(self, item: Item) -> bool:
        """Queues a batch; never blocks. False (and the buffer is freed) when it would overflow."""
        if self.dropped:
            return False
        if self.added - self.taken + len(item[3]) > self.limit:
            self.dropped = True
            self.items.clear()
        else:
            self.items.append(item)
            self.added += len(item[3])
        self.ready.set()
        return not self.dropped

    def take(self, timeout: float) -> list[Item]:
        """Every queued batch, waiting up to `timeout` seconds for the first."""
        if not self.items and not self.dropped:
            self.ready.wait(timeout)
        self.ready.clear()  # before draining: a batch offered from now on sets it again
        items = []
        while True:
            try:
                item = self.items.popleft()
            except IndexError:
                return items
            items.append(item)
            self.taken += len(item[3])


class Stream:
    """The hub's state for one followed stream: its cursor and its subscriptions."""

    def __init__(self, cursor: str) -> None:
        self.cursor, self.position = cursor, parse_stream_id(cursor)
        self.subscriptions: set[Subscription] = set()


class Hub:
    """The process's reader: one Redis connection, one thread (a greenlet under gevent)."""

    def __init__(self, events: EventLog) -> None:
        self.events, self.pid = events, os.getpid()
        self.name = f"{events.prefix}-hub-{socket.gethostname()}-{self.pid}"
        self.reader = self._connect(events.redis, self.name)
        self.wake_key, self.wake_cursor = f"{events.prefix}:hubwake:{uuid.uuid4().hex}", "0-0"
        self.streams: dict[str, Stream] = {}
        self.lock = threading.Lock()
        self.down_since: float | None = None
        self.read_slots = threading.BoundedSemaphore(READ_SLOTS)
        self.thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
        self.thread.start()

    @staticmethod
    def _connect(pooled: redis.Redis, name: str) -> redis.Redis:
        """A connection of its own, named (CLIENT LIST shows it), whose reads outlast a block."""
        kwargs = {**pooled.connection_pool.connection_kwargs, "client_name": name,
                  "socket_timeout": BLOCK_MS / 1000 + 10, "socket_connect_timeout": 5}
        pool = redis.ConnectionPool(connection_class=pooled.connection_pool.connection_class, **kwargs)
        return redis.Redis(connection_pool=pool)  # connects on its first read: Redis may be away now

    def subscribe(self, session_id: str, cursor: str, limit: int) -> tuple[Subscription, str]:
        """Subscribes a follower that has read through `cursor`, with a buffer of `limit` events; returns
        it and the hub's cursor for the stream (later batches start there; anything between the two the
        follower reads itself)."""
        key, subscription = self.events.key(session_id), Subscription(limit)
        with self.lock:
            stream = self.streams.get(key)
            new = stream is None
            if new:
                stream = self.streams[key] = Stream(cursor)
            stream.subscriptions.add(subscription)
            hub_cursor = stream.cursor
        if new:
            self._wake()
        return subscription, hub_cursor

    def unsubscribe(self, session_id: str, subscription: Subscription) -> None:
        """Forgets a follower; a stream nobody follows is no longer read."""
        key = self.events.key(session_id)
        with self.lock:
            stream = self.streams.get(key)
            if stream is not None:
                stream.subscriptions.discard(subscription)
                if not stream.subscriptions:
                    del self.streams[key]

    def _wake(self) -> None:
        """Ends the hub's current block, so it reads the new stream now. An entry in the hub's private
        stream, not CLIENT UNBLOCK: it cannot race with the hub sending its next XREAD."""
        try:
            pipe = self.events.redis.pipeline(transaction=False)
            pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self.wake_key, WAKE_TTL_SECONDS)
            pipe.execute()
        except REDIS_DOWN:
            pass  # the hub is retrying anyway and picks the stream up on its next read

    def is_down(self) -> bool:
        return self.down_since is not None

    def _run(self) -> None:
        """Reads and dispatches until the process ends."""
        while True:
            try:
                self._read_once()
            except REDIS_DOWN as exc:
                if self.down_since is None:
                    log.warning("event hub lost Redis (%s); retrying", exc)
                self.down_since = self.down_since or time.monotonic()
                time.sleep(RETRY_PAUSE_SECONDS)
            except Exception:  # the hub must outlive any surprise; its followers time out meanwhile
                log.exception("event hub read failed")
                time.sleep(RETRY_PAUSE_SECONDS)

    def _read_once(self) -> None:
        """One XREAD BLOCK over every followed stream (and the wake-up stream); hands out what came."""
        with self.lock:
            snapshot = {key: (stream, stream.cursor) for key, stream in self.streams.items()}
        positions = {key: cursor for key, (_, cursor) in snapshot.items()}
        positions[self.wake_key] = self.wake_cursor
        reply = self.reader.xread(positions, count=READ_COUNT, block=BLOCK_MS)
        if self.down_since is not None:
            log.info("event hub reconnected to Redis")
            self.down_since = None
        for key, entries in reply or []:
            if key == self.wake_key:
                self.wake_cursor = entries[-1][0]
            elif entries and key in snapshot:
                self._dispatch(key, snapshot[key][0], entries)

    def _dispatch(self, key: str, stream: Stream, entries: list) -> None:
        """Hands one stream's batch to each of its subscribers; drops those that are full."""
        events = EventLog._decode(entries)
        after = entries[-1][0]
        with self.lock:
            if self.streams.get(key) is not stream:
                return  # unfollowed (and maybe followed again, from another cursor) meanwhile
            item = (stream.position, after, parse_stream_id(after), events)
            stream.cursor, stream.position = after, item[2]
            full = [s for s in stream.subscriptions if not s.offer(item)]
            for subscription in full:
                stream.subscriptions.discard(subscription)
            if not stream.subscriptions:
                del self.streams[key]


_HUBS: "weakref.WeakKeyDictionary[EventLog, Hub]" = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()


def hub_for(events: EventLog) -> Hub:
    """The process's hub for this event log, started on first use (and again in a forked child)."""
    with _HUBS_LOCK:
        hub = _HUBS.get(events)
        if hub is None or hub.pid != os.getpid() or not hub.thread.is_alive():
            hub = _HUBS[events] = Hub(events)
        return hub


class Feed:
    """One follower's events after a cursor: replayed with XRANGE, then live from the hub.

    `next()` raises SlowClient when the hub dropped it (or, with `rejoin`, replays from Redis and
    subscribes again), and redis.ConnectionError while Redis is away, for the caller's Outage to count.
    """

    def __init__(self, hub: Hub, session_id: str, cursor: str, limit: int, rejoin: bool = False) -> None:
        self.hub, self.session_id, self.limit, self.rejoin = hub, session_id, limit, rejoin
        self.cursor, self.position = cursor, parse_stream_id(cursor)
        self.subscription: Subscription | None = None
        self.pending: deque[Item] = deque()
        self.hole_end: str | None = None  # read with XRANGE up to here before the pending batches

    def next(self, timeout: float) -> list[Event]:
        """The next events (in order, each once), or [] after `timeout` seconds without any."""
        if self.subscription is None:
            return self._replay()
        if self.hole_end is not None:
            return self._fill()
        if not self.pending:
            if self.hub.is_down() and not self.subscription.items:
                raise redis.ConnectionError("the event hub is not reading Redis")  # the caller's Outage pauses
            self.pending.extend(self.subscription.take(timeout))
            if self.subscription.dropped and not self.pending:
                return self._dropped()
        return self._from_pending()

    def _replay(self) -> list[Event]:
        """Catches up from Redis; once caught up, subscribes to the hub."""
        batch = self._read()
        if len(batch) < READ_COUNT:
            self.subscription, hub_cursor = self.hub.subscribe(self.session_id, self.cursor, self.limit)
            if parse_stream_id(hub_cursor) > self.position:
                self.hole_end = hub_cursor  # the hub read these before we joined
        return batch

    def _fill(self) -> list[Event]:
        """Reads the hole between this follower's cursor and where the hub's batches start."""
        batch, end = self._read(), self.hole_end
        if len(batch) < READ_COUNT or self.position >= parse_stream_id(end):
            if parse_stream_id(end) > self.position:  # a short read ends the stream: only foreign entries left
                self.cursor, self.position = end, parse_stream_id(end)
            self.hole_end = None
        return batch

    def gap_after(self) -> str | None:
        """The newest trimmed id when events after the cursor were trimmed away, else None."""
        with self.hub.read_slots:
            return self.hub.events.gap_after(self.session_id, self.cursor)

    def _read(self) -> list[Event]:
        with self.hub.read_slots:
            batch = self.hub.events.read(self.session_id, self.cursor, count=READ_COUNT)
        if batch:
            self.cursor, self.position = batch[-1].id, parse_stream_id(batch[-1].id)
        return batch

    def _from_pending(self) -> list[Event]:
        """The pending batches' events after the cursor; a batch that starts past it opens a hole first."""
        out: list[Event] = []
        while self.pending:
            before, after, after_position, events = self.pending[0]
            if before > self.position:
                self.hole_end = f"{before[0]}-{before[1]}"
                break
            self.pending.popleft()
            if before == self.position:
                out += events
            elif after_position > self.position:
                out += [e for e in events if parse_stream_id(e.id) > self.position]
            else:
                continue  # this follower read all of it already
            self.cursor, self.position = after, after_position
        return out

    def _dropped(self) -> list[Event]:
        """SlowClient, or with `rejoin` a fresh replay from Redis."""
        self.close()
        if not self.rejoin:
            raise SlowClient(self.cursor, self.limit)
        return []

    def close(self) -> None:
        """Leaves the hub; the feed replays from its cursor if used again."""
        if self.subscription is not None:
            self.hub.unsubscribe(self.session_id, self.subscription)
        self.subscription, self.hole_end = None, None
        self.pending.clear()


def follow(events: EventLog, session_id: str, cursor: str, limit: int, rejoin: bool = False) -> Feed:
    """A feed of the session's events after `cursor` through this process's hub, buffering up to `limit`."""
    return Feed(hub_for(events), session_id, cursor, limit, rejoin)

