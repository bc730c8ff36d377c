"""Batched publishing of a turn's events against a real Redis: the fenced script and the group-commit publisher."""
from __future__ import annotations

import statistics
import threading
import time
import uuid

import pytest
import redis

from core.claimed import ClaimedSession, ClaimedTurn
from core.envelope import Event
from core.events import EventLog
from workers.publisher import Publisher


@pytest.fixture
def events(settings) -> EventLog:
    return EventLog(redis.Redis.from_url(settings.redis_url, decode_responses=True), f"{settings.key_prefix}pub",
                    maxlen=100_000)


@pytest.fixture
def turn() -> tuple[ClaimedSession, ClaimedTurn]:
    """A fresh (session, turn) pair, as the turn runner holds them."""
    return ClaimedSession(id=str(uuid.uuid4())), ClaimedTurn(id=str(uuid.uuid4()), seq=3, attempt=1)


def event(session: ClaimedSession, turn: ClaimedTurn, n: int, kind: str = "claude.stream_event") -> Event:
    return Event(session_id=session.id, turn_id=turn.id, seq=turn.seq, type=kind, data={"n": n})


def numbers(events: EventLog, session: ClaimedSession) -> list:
    return [e.data.get("n") for e in events.read(session.id, count=100_000)]


def test_many_events_go_out_in_order_and_the_mark_is_updated_once_with_every_field(events, turn):
    session, t = turn
    started = events.publish_marked(event(session, t, 0, "turn.started"), t.id, 0, "first", 1)
    ids = events.publish_marked_many([(event(session, t, n), n, "last") for n in range(1, 6)]
                                     + [(event(session, t, 5, "turn.completed"), 5, "final")], t.id, 1)
    assert all(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert numbers(events, session) == [0, 1, 2, 3, 4, 5, 5]
    assert events.take_mark(t.id, 1) == {"number": "5", "attempt": "1", "first": started, "last": ids[4],
                                            "final": ids[5]}


def test_an_older_attempt_publishes_nothing(events, turn):
    session, t = turn
    events.publish_marked_many([(event(session, t, 1), 1, "last")], t.id, 1)
    events.take_mark(t.id, 2)  # a re-attaching worker took the turn
    assert events.publish_marked_many([(event(session, t, n), n, "last") for n in (2, 3)], t.id, 1) is None
    assert numbers(events, session) == [1]
    assert events.take_mark(t.id, 2)["number"] == "1"


def test_lines_already_published_are_skipped_and_the_rest_published(events, turn):
    session, t = turn
    events.publish_marked_many([(event(session, t, n), n, "last") for n in (1, 2, 3)], t.id, 1)
    events.take_mark(t.id, 2)
    ids = events.publish_marked_many([(event(session, t, n), n, "last") for n in (2, 3, 4, 4, 5)], t.id, 2)
    assert [i is not None for i in ids] == [False, False, True, False, True]
    assert numbers(events, session) == [1, 2, 3, 4, 5]
    assert events.take_mark(t.id, 2)["number"] == "5"


def test_nothing_is_published_after_the_final_event(events, turn):
    session, t = turn
    ids = events.publish_marked_many([(event(session, t, 1), 1, "last"), (event(session, t, 1, "turn.failed"), 1, "final"),
                                      (event(session, t, 2), 2, "last")], t.id, 1)
    assert ids[0] and ids[1] and ids[2] is None
    assert events.publish_marked_many([(event(session, t, 3), 3, "last")], t.id, 1) is None
    assert events.publish_marked(event(session, t, 3, "turn.failed"), t.id, 3, "final", 1) is None
    assert numbers(events, session) == [1, 1]
    assert events.take_mark(t.id, 1)["final"] == ids[1]


def test_the_stream_stays_near_its_maximum_length(settings, turn):
    session, t = turn
    small = EventLog(redis.Redis.from_url(settings.redis_url, decode_responses=True), f"{settings.key_prefix}pub",
                     maxlen=50)
    for start in range(1, 1000, 100):
        small.publish_marked_many([(event(session, t, n), n, "last") for n in range(start, start + 100)], t.id, 1)
    length = small.redis.xlen(small.key(session.id))
    # Trimming is approximate (whole nodes of 100 entries): near 50, far below the 1000 published.
    assert 50 <= length <= 150
    assert numbers(small, session)[-1] == 1000


def test_lines_arriving_quickly_share_round_trips_yet_all_arrive_in_order(events, turn):
    session, t = turn
    publisher = Publisher(events, session, t, max_events=50)
    for n in range(1, 2001):
        publisher.add("claude.stream_event", {"n": n, "pad": "x" * 1000}, n)
    publisher.flush()
    publisher.close()
    assert numbers(events, session) == list(range(1, 2001))
    assert 2000 / 50 <= publisher.round_trips < 2000 / 4  # batched, and no batch above its bound
    assert events.take_mark(t.id, 1)["number"] == "2000"


def test_a_batch_stays_within_its_byte_bound(events, turn):
    session, t = turn
    publisher = Publisher(events, session, t, max_bytes=10_000)
    for n in range(1, 201):
        publisher.add("claude.stream_event", {"n": n, "pad": "x" * 1000}, n)
    publisher.close()
    assert numbers(events, session) == list(range(1, 201))
    assert publisher.round_trips >= 200 * 1000 / 10_000


def test_a_line_arriving_alone_is_published_at_once(settings, events, turn):
    session, t = turn
    publisher = Publisher(events, session, t)
    reader = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    key, last, delays = events.key(session.id), "0-0", []
    for n in range(1, 21):
        got = threading.Event()

        def wait_for_it(got: threading.Event) -> None:
            nonlocal last
            reply = reader.xread({key: last}, block=2000)
            last = reply[0][1][-1][0]
            got.set()

        waiter = threading.Thread(target=wait_for_it, args=(got,))
        waiter.start()
        time.sleep(0.02)  # the reader is blocked in XREAD, the publisher idle
        sent = time.perf_counter()
        publisher.add("claude.stream_event", {"n": n}, n)
        assert got.wait(2)
        delays.append(time.perf_counter() - sent)
        waiter.join()
    publisher.close()
    assert statistics.median(delays) < 0.005, delays  # no waiting for company while Redis is idle
    assert publisher.round_trips == 20


def test_the_turn_is_lost_when_a_later_attempt_owns_it(events, turn):
    session, t = turn
    publisher = Publisher(events, session, t)
    assert publisher.publish("turn.started", {}, 0, "first") is not None
    events.take_mark(t.id, 2)
    assert publisher.publish("claude.system", {"n": 1}, 1) is None
    assert t.lost is True
    assert publisher.add("claude.system", {"n": 2}, 2) is None  # dropped without a round trip
    publisher.close()
    assert numbers(events, session) == [None]


def test_redis_staying_away_is_raised_to_the_reader(turn):
    session, t = turn
    away = EventLog(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), "ccdt-nowhere", 100)
    publisher = Publisher(away, session, t, patience=0)
    publisher.add("claude.system", {"n": 1}, 1)
    with pytest.raises(redis.ConnectionError):
        publisher.flush()
    with pytest.raises(redis.ConnectionError):
        publisher.add("claude.system", {"n": 2}, 2)
    publisher.close()
